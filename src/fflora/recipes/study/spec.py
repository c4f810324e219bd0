"""A study's specification (`StudySpec`, read from a TOML or JSON file), its cells, the metrics its
evaluations give, and what the finished cells' records say so far (each method's chosen rate)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ...utils.method_names import DEFAULT_METHOD
from ..settings import TrainConfig, check_evaluation

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
EVALUATION_KEYS = {"name", "mode", "tasks", "limit", "form", "batch_size", "max_new_tokens", "max_length", "engine"}


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
            try:
                check_evaluation(evaluation["tasks"], evaluation["mode"], evaluation.get("engine"))
            except ValueError as e:
                raise ValueError(f"evaluation {evaluation['name']!r}: {e}") from None
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
        if not path.is_file():
            raise FileNotFoundError(f"no study spec at {path}: give a TOML or JSON file (the studies shipped: "
                                    "benchmarks/study-*.toml)")
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
