"""The accuracy study: methods x learning rates x seeds, each cell a normal training run and evaluation.

`fflora study SPEC` (a TOML or JSON file, see `benchmarks/study-cloze.toml`) runs two phases:

* sweep: every method at every learning rate, one seed, shorter runs judged on the dev loss alone
  (the held-out response-token loss on a fixed slice of the training mixture, never a test set);
* base: the base model itself, no training: its dev loss and both accuracies on the same items, the
  trivial baseline every final cell is read against;
* final: each method at its best sweep rate (a rate at which a final run diverges, its loss NaN or
  above `final_max_loss_ratio` x its first logged loss, is dropped, and the method's final cells
  move to its next-best rate), with its number of seeds, longer runs, scored by the spec's
  evaluations (by default on the first `eval_limit` test items of every set in two ways:
  log-likelihood of the label response, LLM-Adapters' format, with the best constant-label
  baseline, and of each choice's own text, acc and acc_norm).

Every cell trains in the one dtype its spec names. A finished cell writes one JSON record under
`results/<study>/` (per-example predictions, loss curve, gradient norms, active seconds) and is
skipped afterwards; an interrupted cell resumes from its last checkpoint under `runs/<study>/`.
Cells can run in any order (see `plan` for the one chosen); `until` stops before a cell the
measured ones say would not end in time (`schedule`). The aggregate pairs FFBA with LoRA and
decides between them on the spec's primary metric (`decide`).

The package: `spec` (the specification, its cells and metrics), `schedule` (how long cells take,
the deadline), `runner` (the plan and the cells), `report` (the aggregate).
"""

from .report import aggregate, decide, format_aggregate, write_aggregate
from .runner import plan, run_cell, run_study
from .schedule import parse_until
from .spec import Cell, StudySpec, best_rates, metrics_of, read_records

__all__ = ["Cell", "StudySpec", "aggregate", "best_rates", "decide", "format_aggregate", "metrics_of", "parse_until",
           "plan", "read_records", "run_cell", "run_study", "write_aggregate"]
