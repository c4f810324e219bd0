"""Running a study: which cells run next (`plan`), one cell's training, evaluation and record
(`run_cell`), and the loop that runs them within a deadline and writes the aggregate (`run_study`)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from pathlib import Path

import torch

from ...methods.adapter_files import RUN_FILE
from ...models.base_models import load_base_model
from ...utils.files import atomic_write_text, read_jsonl
from ...utils.sources import say
from ..artifacts import load_trained
from ..evaluate import evaluate, response_loss
from ..settings import TrainConfig
from ..train import CONFIG_FILE, TrainingDivergedError, dev_records, train
from .report import aggregate, write_aggregate
from .schedule import SAFETY, PauseWatch, cell_seconds
from .spec import BASE_CELL, COMPARED, ROW_COLUMNS, Cell, StudySpec, best_rates, read_records


def plan(spec: StudySpec, records: dict[str, dict], phase: str | None = None) -> tuple[list[Cell], int]:
    """(cells that can run now, in the order to run them; final cells still waiting for their
    method's sweep), of one phase only when `phase` is given.

    The order serves the decision (FFBA against LoRA) first, so that a study stopped part way
    already holds a paired comparison, and then its seeds: the compared pair's (COMPARED) first final
    cells (seed 0), the base model's cell, the pair's sweep cells, its further seeds (seed 1 of each,
    then seed 2, ...); then the other methods' final cells that are ready, then their sweep cells.
    `phase="sweep"` runs the short cells alone, e.g. when a session has too little time left for a
    final cell; `phase="final"` the evaluated ones (final cells and the base model's)."""
    if phase not in (None, "sweep", "final"):
        raise ValueError(f"phase must be 'sweep' or 'final', not {phase!r}")
    best = best_rates(spec, records)
    ready = [m for m in spec.seeds if m in best]
    finals = [Cell("final", m, best[m], seed) for seed in range(max(spec.seeds.values(), default=0))
              for m in ready if seed < spec.seeds[m]]
    sweeps = [Cell("sweep", m, lr, 0) for m in spec.methods for lr in spec.learning_rates]
    compared = [c for c in finals if c.method in COMPARED]
    order = ([c for c in compared if c.seed == 0] + [BASE_CELL] + [c for c in sweeps if c.method in COMPARED]
             + [c for c in compared if c.seed > 0] + [c for c in finals if c.method not in COMPARED]
             + [c for c in sweeps if c.method not in COMPARED])
    wanted = {None: ("final", "base", "sweep"), "final": ("final", "base"), "sweep": ("sweep",)}[phase]
    waiting = sum(count for method, count in spec.seeds.items() if method not in best) if "final" in wanted else 0
    return [c for c in order if c.key not in records and c.phase in wanted], waiting


def run_cell(spec: StudySpec, cell: Cell, results_dir: Path, runs_dir: Path) -> dict:
    """Train (or resume, or reuse a finished run), evaluate a final cell, write its record atomically.
    The record's `timing` holds the cell's active seconds (pauses taken out, see `schedule`) for
    training and for evaluation: what `run_study(until=...)` plans the next cells with."""

    with PauseWatch() as watch:
        if cell.phase == "base":  # one load of the base model for its dev loss and its evaluation
            model, tokenizer = load_base_model(spec.model)
            record = _base_record(spec, model, tokenizer)
        else:
            record = _trained_record(spec, cell, runs_dir, watch)
        if cell.phase in ("final", "base") and "diverged" not in record:
            start = watch.active()
            if cell.phase == "final":
                model, tokenizer, _ = load_trained(Path(spec.train_config(cell, runs_dir).output_dir), spec.model)
            record |= _evaluate_all(spec, model.to(spec.device).eval(), tokenizer, runs_dir / spec.name / cell.key)
            record["timing"]["evaluate_s"] = watch.active() - start
        record["timing"] |= {"wall_s": watch.wall(), "paused_s": watch.paused_s}
    return _write_record(results_dir, cell, record)


def _trained_record(spec: StudySpec, cell: Cell, runs_dir: Path, watch: PauseWatch) -> dict:
    """A sweep or final cell's record up to its evaluation: its training run (resumed from its last
    checkpoint, or read back where it finished before), or what made it diverge."""
    cfg = spec.train_config(cell, runs_dir)
    out = Path(cfg.output_dir)
    head = {"cell": {"phase": cell.phase, "method": cell.method, "lr": cell.lr, "seed": cell.seed},
            "device": spec.device}
    start = watch.active()
    if (out / RUN_FILE).is_file():
        trained, steps_run = json.loads((out / RUN_FILE).read_text()), 0  # trained before; evaluation was cut off
    else:
        try:
            trained = train(cfg, resume=(out / CONFIG_FILE).is_file())
        except TrainingDivergedError as e:  # a result too: this rate is too high for the method
            return head | {"diverged": str(e), "train": {"dev_loss": None},
                           "timing": {"train_s": watch.active() - start, "steps_run": 0}}
        steps_run = trained["steps_run"]
    keys = ("dev_loss", "train_loss", "global_step", "wall_time_s", "seconds_per_step", "tokens", "tokens_per_s",
            "resumed_from", "loss_curve", "grad_norm")
    return head | {"train": {k: trained.get(k) for k in keys} | {"dtype": (trained.get("dtype") or {}).get("dtype")},
                   "parameters": trained["parameters"]["trainable"], "config": trained["config"],
                   "timing": {"train_s": watch.active() - start, "steps_run": steps_run}}


def _base_record(spec: StudySpec, model, tokenizer) -> dict:
    """The untrained base model's dev loss: scored as the final cells are (float32, as every trained
    cell's dev loss, `fflora.recipes.train`), then evaluated like them."""
    max_length = spec.train.get("max_length", TrainConfig.max_length)
    form = spec.train.get("form", TrainConfig.form)
    dev = response_loss(model, tokenizer, dev_records(spec.task, spec.dev_size, spec.data_dir), max_length, form=form)
    return {"cell": {"phase": "base", "method": "base", "lr": None, "seed": None}, "parameters": 0,
            "device": spec.device, "train": {"dev_loss": dev}, "timing": {"train_s": 0.0, "steps_run": 0}}


def _write_record(results_dir: Path, cell: Cell, record: dict) -> dict:
    """Write a finished cell's record atomically (a cell with a record is never run again); returns it."""
    atomic_write_text(results_dir / f"{cell.key}.json", json.dumps(record, indent=1) + "\n")
    return record


def _autocast(spec: StudySpec):
    return torch.autocast("cuda", dtype=torch.bfloat16) if spec.device == "cuda" else contextlib.nullcontext()


def _evaluate_all(spec: StudySpec, model, tokenizer, out: Path) -> dict:
    """{"eval": summary per evaluation, "predictions": per-example rows per evaluation} of `model` (on
    the spec's device); the evaluation files go to `out`. A row is [data set, id, *ROW_COLUMNS[mode]];
    items without a score (a reference response too long for max_length) are left out."""

    result = {"eval": {}, "predictions": {}}
    for evaluation in spec.scored():
        name, mode = evaluation["name"], evaluation["mode"]
        options = {k: v for k, v in evaluation.items() if k not in ("name", "mode", "tasks", "limit")}
        output = out / f"eval-{name}.json"
        with _autocast(spec):
            result["eval"][name] = evaluate(model, tokenizer, evaluation["tasks"], data_dir=spec.data_dir,
                                            limit=evaluation["limit"] or None, mode=mode, output=output, **options)
        rows = read_jsonl(output.with_suffix(".predictions.jsonl"))
        result["predictions"][name] = [[r["dataset"], r["id"], *(_cell_value(r[c]) for c in ROW_COLUMNS[mode])]
                                       for r in rows if all(r.get(c) is not None for c in ROW_COLUMNS[mode][-1:])]
    return result


def _cell_value(value):
    return int(value) if isinstance(value, bool) else value


def run_study(spec: StudySpec, results_root: str | Path = "results", runs_root: str | Path = "runs",
              max_cells: int | None = None, phase: str | None = None, until: dt.datetime | None = None) -> dict:
    """Run every cell not yet finished (at most `max_cells`, of `phase` only if given), then write the
    aggregate; returns it. With `until` (a local wall-clock time), a cell starts only when the cells
    already measured say it ends before then (`schedule.cell_seconds`, with a margin): the first
    cell of the plan that fits runs, and where none fits the run stops and the aggregate's `runner`
    says so. A cell no measurement covers yet (the study's first) is started: only running one
    measures it, and a cut-off cell resumes from its last checkpoint."""
    results_dir, runs_dir = Path(results_root) / spec.name, Path(runs_root)
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("the study asks for device 'cuda' but torch sees no CUDA device; use device = \"cpu\"")
    other = sorted({r.get("device", "cpu") for r in read_records(results_dir).values()} - {spec.device}) \
        if results_dir.is_dir() else []
    if other:
        raise ValueError(f"{results_dir} holds cells run on {other}, this run is on {spec.device!r}: give the "
                         "study another name so that its numbers are not mixed")
    results_dir.mkdir(parents=True, exist_ok=True)
    ran, stopped = 0, None
    while max_cells is None or ran < max_cells:
        records = read_records(results_dir)
        todo, waiting = plan(spec, records, phase)
        if not todo:
            break
        estimates = {c: cell_seconds(c.phase, c.method, spec.steps(c.phase), list(records.values())) for c in todo}
        waiting_s = cell_seconds("final", "", spec.final_steps, list(records.values())) if waiting else 0.0
        known = [e for e in [*estimates.values(), waiting_s] if e is not None]
        cell = todo[0]
        if until is not None:
            left = (until - dt.datetime.now()).total_seconds()
            fits = [c for c in todo if estimates[c] is None or SAFETY * estimates[c] < left]
            if not fits:
                stopped = {"until": until.isoformat(timespec="minutes"), "next": todo[0].key,
                           "at": dt.datetime.now().isoformat(timespec="seconds"),
                           "next_estimate_s": round(estimates[todo[0]]), "left_s": round(left)}
                say(f"study {spec.name}: stopping before {todo[0].key}: it takes about {estimates[todo[0]] / 60:.0f} min "
                    f"and {max(left, 0) / 60:.0f} min are left before {stopped['until']}; run the study again to go on")
                break
            cell = fits[0]
        say(f"study {spec.name}: {len(records)} done, running {cell.key}"
            + (f" (about {estimates[cell] / 60:.0f} min)" if estimates[cell] else " (not yet measured)")
            + f", {len(todo) + waiting - 1} left after it"
            + (f", about {sum(known) / 3600:.1f} h to go" if len(known) == len(todo) + 1 else ""))
        run_cell(spec, cell, results_dir, runs_dir)
        ran += 1
    records = read_records(results_dir)
    result = aggregate(spec, records) | {"runner": stopped}
    write_aggregate(result, results_dir)
    return result
