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
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models.base_models import load_base_model
from ..utils.files import atomic_write_text
from ..utils.method_names import DEFAULT_METHOD
from ..utils.sources import say
from .artifacts import RUN_FILE, load_trained
from .evaluate import evaluate, response_loss
from .schedule import SAFETY, PauseWatch, cell_seconds, study_seconds
from .stats import mean_std, paired_bootstrap, set_average
from .settings import TrainConfig
from .train import CONFIG_FILE, TrainingDivergedError, dev_records, train

# Per evaluation mode: the columns of a prediction row after [data set, id], and its metrics:
# name -> (column of the row, kind, the baseline each set's summary names). "accuracy" columns are
# 0/1 and report in percent; "nll" columns are per-item losses (lower is better), reported as is.
ROW_COLUMNS = {"loglik": ("prediction", "correct"), "generate": ("prediction", "correct"),
               "text": ("prediction", "correct", "prediction_norm", "correct_norm", "nll"), "nll": ("nll", "tokens")}
MODE_METRICS = {
    "loglik": {"label acc": (3, "accuracy", "best_constant")},
    "text": {"text acc": (3, "accuracy", "chance"), "text acc_norm": (5, "accuracy", "chance"),
             "gold nll": (6, "nll", None)},
    "nll": {"{name} nll": (2, "nll", None)},
    "generate": {"{name} exact match": (3, "accuracy", "best_constant")},
}
BASELINE_NAMES = {"best_constant": "best constant answer", "chance": "chance"}
TRAIN_DTYPES = ("float32", "bfloat16")
EVALUATION_KEYS = {"name", "mode", "tasks", "limit", "form", "batch_size", "max_new_tokens", "max_length"}


@dataclass(frozen=True)
class Metric:
    """One figure the aggregate reports: where its per-item values are, and what it is read against."""

    name: str
    evaluation: str  # the evaluation whose prediction rows hold it
    column: int
    kind: str  # "accuracy" or "nll"
    baseline: str | None  # the key each set's evaluation summary gives the baseline under

    @property
    def scale(self) -> float:
        return 100.0 if self.kind == "accuracy" else 1.0


def metrics_of(spec: StudySpec) -> dict[str, Metric]:
    """The study's metrics, by name, in the order of its evaluations."""
    out = {}
    for evaluation in spec.scored():
        for template, (column, kind, baseline) in MODE_METRICS[evaluation["mode"]].items():
            name = template.format(name=evaluation["name"])
            out[name] = Metric(name, evaluation["name"], column, kind, baseline)
    return out
_STUDY_OWNED = {"task", "output_dir", "model", "data_dir", "dev_size", "lr", "seed", "max_steps",
                "max_loss_ratio"}


@dataclass
class StudySpec:
    name: str
    methods: dict[str, dict]  # method name -> TrainConfig fields ({"method": "ffba", "r": 8, ...})
    learning_rates: list[float]
    seeds: dict[str, int]  # method name -> seeds at its best rate
    task: str = "commonsense"
    model: str | None = None
    data_dir: str | None = None
    dev_size: int = 400
    eval_limit: int = 250
    sweep_steps: int = 100
    final_steps: int = 400
    train: dict = field(default_factory=dict)  # TrainConfig fields shared by every cell
    device: str = "cpu"  # "cuda": training and evaluation on the GPU with bfloat16 autocast
    # A final run whose logged loss exceeds this x its first logged loss has diverged (as a NaN
    # loss has): its rate is dropped. Sweep runs are judged by their dev loss instead.
    final_max_loss_ratio: float | None = None
    # What every final cell and the base model are scored on: a list of {"name", "mode" (loglik,
    # text, nll, generate), "tasks" (default: the study's task), "limit" (default: eval_limit; 0:
    # every item), "form", "batch_size", "max_new_tokens", "max_length"}. Default: the label format
    # (loglik) and the choices' texts (text) on the first eval_limit items of each set.
    evaluations: list[dict] | None = None
    # The decision (`decide`): FFBA - LoRA on the primary metric (a loss, e.g. "gold nll"), then on
    # each secondary one (accuracies); see `decide`.
    primary: str | None = None
    secondary: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if not self.methods or not self.learning_rates:
            raise ValueError("a study needs at least one method and one learning rate")
        if BASE_CELL.method in self.methods:
            raise ValueError(f"{BASE_CELL.method!r} names the untrained base model's cell; give the method another name")
        missing = [m for m in self.seeds if m not in self.methods]
        if missing:
            raise ValueError(f"seeds given for methods the spec does not define: {missing}")
        for name, overrides in self.methods.items():  # fails now, not hours into the study
            self.train_config(Cell("sweep", name, self.learning_rates[0], 0), Path("unused"))
        for evaluation in self.scored():
            unknown = set(evaluation) - EVALUATION_KEYS
            if unknown or evaluation["mode"] not in MODE_METRICS:
                raise ValueError(f"evaluation {evaluation}: unknown keys {sorted(unknown)} or mode; keys are "
                                 f"{sorted(EVALUATION_KEYS)}, modes {sorted(MODE_METRICS)}")
        names = [template.format(name=e["name"]) for e in self.scored() for template in MODE_METRICS[e["mode"]]]
        if len(names) != len(set(names)) or len({e["name"] for e in self.scored()}) != len(self.scored()):
            raise ValueError("two evaluations of the study share a name or a metric (one loglik and one text "
                             "evaluation at most; name the nll and generate ones apart)")
        if self.train.get("dtype") not in TRAIN_DTYPES:
            raise ValueError(f"train.dtype is {self.train.get('dtype')!r}: a study trains every cell in one dtype, "
                             f"written in its spec; set dtype to one of {list(TRAIN_DTYPES)} under [train] "
                             "(\"auto\" measures per run and can give two methods two dtypes)")
        known = {template.format(name=e["name"]) for e in self.scored() for template in MODE_METRICS[e["mode"]]}
        unknown = [m for m in [self.primary, *self.secondary] if m is not None and m not in known]
        if unknown:
            raise ValueError(f"primary/secondary name metrics the evaluations do not give: {unknown}; "
                             f"the study's metrics are {sorted(known)}")
        for key in ("eval_limit", "sweep_steps", "final_steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")

    @classmethod
    def load(cls, path: str | Path) -> StudySpec:
        path = Path(path)
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError as e:  # Python 3.10
                raise ValueError(f"{path}: TOML specs need Python 3.11 or later; write the spec as JSON") from e
            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown study settings {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)

    def scored(self) -> list[dict]:
        """The evaluations with their defaults filled in."""
        given = self.evaluations or [{"name": "loglik", "mode": "loglik"}, {"name": "text", "mode": "text"}]
        return [{"tasks": [self.task], "limit": self.eval_limit, **e} for e in given]

    def steps(self, phase: str) -> int:
        """Training steps of a cell of `phase` (the base model's cell trains none)."""
        return {"sweep": self.sweep_steps, "final": self.final_steps, "base": 0}[phase]

    def train_config(self, cell: Cell, runs_dir: Path) -> TrainConfig:
        overrides = {**self.train, **self.methods[cell.method]}
        owned = sorted(set(overrides) & _STUDY_OWNED)
        if owned:
            raise ValueError(f"the study sets {owned} itself (method {cell.method!r}); remove them from the spec")
        unknown = sorted(set(overrides) - set(TrainConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"method {cell.method!r}: unknown training settings {unknown}")
        return TrainConfig(task=self.task, output_dir=str(runs_dir / self.name / cell.key), model=self.model,
                           data_dir=self.data_dir, dev_size=self.dev_size, lr=cell.lr, seed=cell.seed,
                           max_loss_ratio=self.final_max_loss_ratio if cell.phase == "final" else None,
                           max_steps=self.steps(cell.phase),
                           **overrides)


@dataclass(frozen=True)
class Cell:
    phase: str  # "sweep", "final" or "base"
    method: str
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return "base-model" if self.phase == "base" else f"{self.phase}-{self.method}-lr{self.lr:g}-seed{self.seed}"


BASE_CELL = Cell("base", "base", 0.0, 0)  # the base model, untrained: evaluated like a final cell
COMPARED = (DEFAULT_METHOD, "lora")  # the pair the study decides between: FFBA against LoRA: their cells run first (see `plan`)


def read_records(results_dir: Path) -> dict[str, dict]:
    """The finished cells' records, by cell key."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json")) if p.stem != "aggregate"}


def best_rates(spec: StudySpec, records: dict[str, dict]) -> dict[str, float]:
    """Each method's learning rate for its final cells, once all its sweep cells are done: the rate
    with the lowest dev loss, among those that trained (a diverged sweep run has no dev loss) and
    at which no final run diverged. A final run is longer than a sweep run and can break down where
    the sweep did not; its method's final cells then move to the next-best rate."""
    best = {}
    for method in spec.methods:
        losses = {}
        for lr in spec.learning_rates:
            record = records.get(Cell("sweep", method, lr, 0).key)
            if record is not None:
                losses[lr] = record["train"]["dev_loss"]
        broke = set(dropped_rates(records, method))
        finite = {lr: loss for lr, loss in losses.items() if loss is not None and lr not in broke}
        if len(losses) == len(spec.learning_rates) and finite:
            best[method] = min(finite, key=finite.get)
    return best


def dropped_rates(records: dict[str, dict], method: str) -> dict[float, str]:
    """The rates at which a final run of `method` diverged, with what happened."""
    return {r["cell"]["lr"]: r["diverged"] for r in records.values()
            if r["cell"]["phase"] == "final" and r["cell"]["method"] == method and "diverged" in r}


def plan(spec: StudySpec, records: dict[str, dict], phase: str | None = None) -> tuple[list[Cell], int]:
    """(cells that can run now, in the order to run them; final cells still waiting for their
    method's sweep), of one phase only when `phase` is given.

    The order serves the decision (FFBA against LoRA) first, so that a study stopped part way
    already holds a paired comparison: each ready method's first final cell (seed 0), the base
    model's cell, the sweep cells of the compared pair (COMPARED), the ready methods' further seeds
    (seed 1 of each, then seed 2, ...), then the other methods' sweep cells. `phase="sweep"` runs the
    short cells alone, e.g. when a session has too little time left for a final cell; `phase="final"`
    the evaluated ones (final cells and the base model's)."""
    if phase not in (None, "sweep", "final"):
        raise ValueError(f"phase must be 'sweep' or 'final', not {phase!r}")
    best = best_rates(spec, records)
    ready = [m for m in spec.seeds if m in best]
    finals = [Cell("final", m, best[m], seed) for seed in range(max(spec.seeds.values(), default=0))
              for m in ready if seed < spec.seeds[m]]
    sweeps = [Cell("sweep", m, lr, 0) for m in spec.methods for lr in spec.learning_rates]
    order = ([c for c in finals if c.seed == 0] + [BASE_CELL] + [c for c in sweeps if c.method in COMPARED]
             + [c for c in finals if c.seed > 0] + [c for c in sweeps if c.method not in COMPARED])
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
        rows = [json.loads(line) for line in output.with_suffix(".predictions.jsonl").read_text().splitlines()]
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


def _item_matrix(records: list[dict], metric: Metric) -> tuple[np.ndarray, list[str], list[str]]:
    """(seeds x items) values of a metric, item data sets and ids, items in one order for every record."""
    rows = [sorted(r["predictions"][metric.evaluation], key=lambda p: (p[0], p[1])) for r in records]
    ids = [p[1] for p in rows[0]]
    if any([p[1] for p in row] != ids for row in rows):
        raise ValueError(f"the final cells were evaluated on different items ({metric.evaluation}); rerun them "
                         "with one evaluation setting")
    return np.array([[p[metric.column] for p in row] for row in rows], dtype=float), [p[0] for p in rows[0]], ids


def _present(metric: Metric, records: list[dict]) -> bool:
    """Whether every record holds the metric (records written before a metric existed do not)."""
    return all(metric.evaluation in r.get("predictions", {}) and r["predictions"][metric.evaluation]
               and len(r["predictions"][metric.evaluation][0]) > metric.column for r in records)


def _baseline(metric: Metric, record: dict) -> dict | None:
    """{"name", "sets", "average"} of a metric's baseline (best constant answer, chance), from a cell's
    evaluation summary; None for metrics read against the base model only (NLL)."""
    datasets = record["eval"].get(metric.evaluation, {}).get("datasets", {})
    if metric.baseline is None or not datasets:
        return None
    sets = {s: d[metric.baseline]["accuracy"] if isinstance(d[metric.baseline], dict) else d[metric.baseline]
            for s, d in datasets.items()}
    name = "best constant label" if metric.name == "label acc" else BASELINE_NAMES[metric.baseline]
    return {"name": name, "sets": sets, "average": sum(sets.values()) / len(sets)}


def aggregate(spec: StudySpec, records: dict[str, dict]) -> dict:
    """Per method (and the untrained base model): dev loss and every metric, mean +- std over seeds, per
    set and on average, next to each set's baseline (best constant answer, chance), and on how many
    sets each seed beats it; paired differences with bootstrap 95% CIs (see `_comparisons`)."""
    best = best_rates(spec, records)
    finals: dict[str, list[dict]] = {}
    for record in records.values():
        cell = record["cell"]
        if cell["phase"] == "final" and "diverged" not in record and best.get(cell["method"]) == cell["lr"]:
            finals.setdefault(cell["method"], []).append(record)
    if BASE_CELL.key in records:
        finals["base"] = [records[BASE_CELL.key]]
    sweep = {m: {r["cell"]["lr"]: r["train"]["dev_loss"] for r in records.values()
                 if r["cell"]["phase"] == "sweep" and r["cell"]["method"] == m} for m in spec.methods}
    every = [r for runs in finals.values() for r in runs]
    metrics = {name: m for name, m in metrics_of(spec).items() if every and _present(m, every)}
    methods = {}
    for method, runs in finals.items():
        entry = {"lr": runs[0]["cell"]["lr"], "seeds": len(runs), "dropped_rates": sorted(dropped_rates(records, method)),
                 "parameters": runs[0]["parameters"],
                 "dev_loss": mean_std([r["train"]["dev_loss"] for r in runs]), "baselines": {}, "sets_above_baseline": {}}
        for name, metric in metrics.items():
            values, groups, _ = _item_matrix(runs, metric)
            per_seed = {g: metric.scale * values[:, np.asarray(groups) == g].mean(axis=1) for g in dict.fromkeys(groups)}
            entry[name] = {"average": mean_std([set_average(row, groups, metric.scale) for row in values]),
                           "sets": {g: mean_std(v) for g, v in per_seed.items()}}
            baseline = _baseline(metric, runs[0])
            if baseline:
                entry["baselines"][name] = baseline
                # per seed, on how many sets the metric beats its baseline (strictly)
                entry["sets_above_baseline"][name] = [
                    int(sum(v[seed] > baseline["sets"][g] for g, v in per_seed.items())) for seed in range(len(runs))]
        entry |= _training_summary(runs)
        methods[method] = entry
    comparisons = {}
    for a, b in _comparisons(finals):
        comparisons[f"{a} - {b}"] = {}
        for name, metric in metrics.items():
            va, groups, ids = _item_matrix(finals[a], metric)
            vb, _, ids_b = _item_matrix(finals[b], metric)
            if ids != ids_b:
                raise ValueError(f"{a} and {b} were evaluated on different items")
            comparisons[f"{a} - {b}"][name] = paired_bootstrap(va, vb, groups, scale=metric.scale)
    active_s, estimated = study_seconds(records)
    return {"study": spec.name, "cells_done": len(records), "sweep_dev_loss": sweep,
            "compute": {"active_hours": active_s / 3600, "device": spec.device, "estimated_cells": estimated},
            "metrics": {name: {"kind": m.kind, "evaluation": m.evaluation} for name, m in metrics.items()},
            "methods": methods, "comparisons": comparisons, "decision": decide(spec, metrics, comparisons)}


def _training_summary(runs: list[dict]) -> dict:
    """A method's training over its seeds: the mean training loss at each logged step, and the
    gradient norm before clipping (median over seeds of each run's median) with the share of steps
    clipping cut (mean over seeds); empty where the records predate them (and for the base model)."""
    out = {}
    curves = [dict(r["train"]["loss_curve"]) for r in runs if r["train"].get("loss_curve")]
    if curves:
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        out["loss_curve"] = [[step, float(np.mean([c[step] for c in curves]))] for step in steps]
    norms = [r["train"]["grad_norm"] for r in runs if r["train"].get("grad_norm")]
    if norms:
        out["grad_norm"] = {"median": float(np.median([n["median"] for n in norms])),
                            "max": max(n["max"] for n in norms), "max_grad_norm": norms[0]["max_grad_norm"],
                            "clipped_share": float(np.mean([n["clipped_share"] for n in norms]))}
    return out


# How FFBA - LoRA is read on a metric, from its 95% interval: "better" or "worse" where the interval
# excludes 0; "equivalent" where it lies within +-margin; else "undecided". The margin of a loss
# (NLL) is this share of LoRA's gain over the base model; of an accuracy, these percentage points.
NLL_MARGIN_SHARE = 0.05
ACCURACY_MARGIN_POINTS = 1.0


def decide(spec: StudySpec, metrics: dict[str, Metric], comparisons: dict[str, dict]) -> dict:
    """FFBA against LoRA on the spec's primary metric and each secondary one (see NLL_MARGIN_SHARE):
    {metric: {"verdict", "difference", "ci95", "margin"}}, for the metrics the finals hold so far."""
    ffba_lora = comparisons.get(" - ".join(COMPARED), {})
    lora_base = comparisons.get(f"{COMPARED[1]} - base", {})
    out = {}
    for name in [spec.primary, *spec.secondary]:
        if name not in ffba_lora or name not in metrics:
            continue
        low, high = ffba_lora[name]["ci95"]
        if metrics[name].kind == "nll":  # lower is better
            better, worse = high < 0, low > 0
            margin = NLL_MARGIN_SHARE * abs(lora_base[name]["difference"]) if name in lora_base else None
        else:
            better, worse = low > 0, high < 0
            margin = ACCURACY_MARGIN_POINTS
        verdict = ("better" if better else "worse" if worse
                   else "equivalent" if margin is not None and -margin <= low and high <= margin else "undecided")
        out[name] = {"verdict": verdict, "difference": ffba_lora[name]["difference"], "ci95": [low, high],
                     "margin": margin, "primary": name == spec.primary}
    return out


def _comparisons(finals: dict[str, list[dict]]) -> list[tuple[str, str]]:
    """The paired differences to report: FFBA - LoRA first (the paper's claim), then every other
    trained method against LoRA, then every trained method against the untrained base model."""
    trained = [m for m in finals if m != "base"]
    pairs = [COMPARED] + [(m, COMPARED[1]) for m in trained if m not in COMPARED]
    pairs += [(m, "base") for m in trained]
    return [(a, b) for a, b in pairs if a in finals and b in finals]


def _digits(result: dict, metric: str) -> int:
    return 4 if result["metrics"][metric]["kind"] == "nll" else 1


def format_aggregate(result: dict) -> str:
    metrics = list(result["metrics"])
    first = next(iter(result["methods"].values()), None)
    with_baseline = [m for m in metrics if first and m in first["baselines"]]
    lines = [f"Study {result['study']} ({result['cells_done']} cells)", "",
             "| method | lr | seeds | trainable | dev loss | " + " | ".join(metrics) + " | "
             + " | ".join(f"{m} > {first['baselines'][m]['name']} (sets, per seed)" for m in with_baseline) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * (len(metrics) + len(with_baseline))]

    def ms(value: dict, digits: int = 1) -> str:
        return f"{value['mean']:.{digits}f} +- {value['std']:.{digits}f}"

    for method, e in result["methods"].items():
        dropped = e.get("dropped_rates")
        lr = "-" if e["lr"] is None else f"{e['lr']:g}"
        lr += f" ({', '.join(f'{x:g}' for x in dropped)}: final run diverged)" if dropped else ""
        name = "base model (no training)" if method == "base" else method
        above = [f"{', '.join(map(str, e['sets_above_baseline'][m]))} of {len(e['baselines'][m]['sets'])}"
                 for m in with_baseline]
        lines.append(f"| {name} | {lr} | {e['seeds']} | {e['parameters']:,} | {ms(e['dev_loss'], 4)} | "
                     + " | ".join(ms(e[m]["average"], _digits(result, m)) for m in metrics) + " | "
                     + " | ".join(above) + " |")
    if first:
        cells = [f"{first['baselines'][m]['average']:.1f} ({first['baselines'][m]['name']})" if m in first["baselines"]
                 else "" for m in metrics]
        lines.append("| baseline on the same items | | | | | " + " | ".join(cells) + " |" + " |" * len(with_baseline))
        for metric in metrics:
            lines += ["", f"{metric} per set (mean +- std over seeds):", ""] + _per_set_table(result, metric)
    trained = {m: e for m, e in result["methods"].items() if "grad_norm" in e}
    if trained:
        lines += ["", "Training (gradient norm before clipping, median over each run's steps; share of steps "
                      "clipping cut):", "", "| method | grad norm (median) | largest | clipped at | clipped steps |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {m} | {e['grad_norm']['median']:.3g} | {e['grad_norm']['max']:.3g} | "
                  f"{e['grad_norm']['max_grad_norm']:g} | {100 * e['grad_norm']['clipped_share']:.0f}% |"
                  for m, e in trained.items()]
        lines += ["", "Clipping scales a step's whole gradient by max_grad_norm / norm. AdamW divides each update by the "
                      "running RMS of the gradients it was given, so a method clipped on every step has its steps "
                      "weighted against each other differently, not its updates shrunk: their size is the learning "
                      "rate, swept per method. A study run without clipping (max_grad_norm = 0) measures the rest."]
    if result.get("decision"):
        lines += ["", "Decision, FFBA - LoRA (better/worse: the 95% interval excludes 0; equivalent: it lies within "
                      "the margin; NLL margin 5% of LoRA's gain over the base model, accuracy 1 point):", ""]
        for metric, d in result["decision"].items():
            n = _digits(result, metric) + 1
            lines.append(f"- {metric}{' (primary)' if d['primary'] else ''}: **{d['verdict']}**, {d['difference']:+.{n}f} "
                         f"[{d['ci95'][0]:+.{n}f}, {d['ci95'][1]:+.{n}f}]"
                         + (f", margin +-{d['margin']:.{n}f}" if d["margin"] is not None else ""))
    if result.get("compute"):
        c = result["compute"]
        lines += ["", f"Compute: {c['active_hours']:.1f} hours of active time on {c['device']} for the "
                      f"{result['cells_done']} cells (pauses taken out"
                      + (f"; {len(c['estimated_cells'])} cells resumed or older than their timing, counted at the "
                         "median of their kind" if c["estimated_cells"] else "") + ")."]
    if result.get("runner"):
        r = result["runner"]
        lines += ["", f"Stopped early at {r['at']}: {r['next']} (about {r['next_estimate_s'] / 60:.0f} min) would not "
                      f"have ended before {r['until']}; the study resumes where it stopped."]
    for name, compared in result["comparisons"].items():
        lines += ["", f"Paired difference {name} (accuracy in percentage points, NLL in nats per token; 95% "
                      "bootstrap CI over items and seeds):", ""]
        lines += [f"- {metric}: {c['difference']:+.{_digits(result, metric) + 1}f} "
                  f"[{c['ci95'][0]:+.{_digits(result, metric) + 1}f}, {c['ci95'][1]:+.{_digits(result, metric) + 1}f}]"
                  + (" (excludes 0)" if c["excludes_zero"] else " (includes 0)") for metric, c in compared.items()]
    return "\n".join(lines)


def _per_set_table(result: dict, metric: str) -> list[str]:
    """Markdown rows: one per method with its value on each set and on average, then the baseline's."""
    methods = result["methods"]
    digits = _digits(result, metric)
    sets = list(next(iter(methods.values()))[metric]["sets"])
    lines = ["| method | " + " | ".join(sets) + " | average |", "|---|" + "---:|" * (len(sets) + 1)]
    for method, e in methods.items():
        cells = [f"{e[metric]['sets'][s]['mean']:.{digits}f} +- {e[metric]['sets'][s]['std']:.{digits}f}" for s in sets]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {e[metric]['average']['mean']:.{digits}f} |")
    baseline = next(iter(methods.values()))["baselines"].get(metric)
    if baseline:
        lines.append(f"| {baseline['name']} | " + " | ".join(f"{baseline['sets'][s]:.1f}" for s in sets)
                     + f" | {baseline['average']:.1f} |")
    return lines


def plot_aggregate(result: dict, path: Path) -> None:
    """Left: the first metric per set for every method (the study's headline: its spec's first
    evaluation); middle: the sweep's dev loss per learning rate; right: each method's training loss
    curve in its final cells (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4))
    methods = result["methods"]
    headline = next(iter(result["metrics"]), None)
    sets = list(next(iter(methods.values()))[headline]["sets"]) if methods and headline else []
    width = 0.8 / max(1, len(methods))
    for k, (method, e) in enumerate(methods.items()):
        values = [e[headline]["sets"][s] for s in sets]
        axes[0].bar([i + k * width for i in range(len(sets))], [v["mean"] for v in values], width,
                    yerr=[v["std"] for v in values], capsize=3, label=method)
    axes[0].set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(sets))], sets, rotation=30)
    axes[0].set_title(f"{headline} per set (mean +- std over seeds)", fontsize=10)
    for method, losses in result["sweep_dev_loss"].items():
        if losses:
            lrs = sorted((lr for lr in losses if losses[lr] is not None), key=float)  # diverged: no point
            axes[1].plot([float(lr) for lr in lrs], [losses[lr] for lr in lrs], marker="o", label=method)
    axes[1].set_xscale("log")
    axes[1].set_title("dev loss after the sweep runs, per learning rate", fontsize=10)
    for method, e in methods.items():
        if e.get("loss_curve"):
            axes[2].plot(*zip(*e["loss_curve"]), label=f"{method} (dev {e['dev_loss']['mean']:.3f})")
    axes[2].set_xlabel("step")
    axes[2].set_title("training loss of the final cells (mean over seeds)", fontsize=10)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_aggregate(result: dict, results_dir: Path) -> None:
    atomic_write_text(results_dir / "aggregate.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(results_dir / "aggregate.md", format_aggregate(result) + "\n")
    plot_aggregate(result, results_dir / "aggregate.png")
