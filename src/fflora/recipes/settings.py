"""The recipes' settings: what defines a training run (`TrainConfig`) and a comparison (`CompareSettings`).

Plain dataclasses that check themselves, without PyTorch: the command line takes its defaults and
help from them (`fflora train --help` imports no torch), and a bad flag fails before any data or
model loads. The recipes that run them: `train`, `compare`. Also, torch-free, what an evaluation may
ask for (`check_evaluation`: `fflora eval`, a study's evaluations, `evaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..utils.method_names import DEFAULT_METHOD, method_names
from .data import FAMILIES, family_of, resolve_tasks

PEERS = ("lora", "full")  # what fflora's methods are trained next to: PEFT's LoRA, full fine-tuning
METHODS = (*method_names(), *PEERS)
TRAIN_DATASETS = {"commonsense": FAMILIES["commonsense"], "math": ("gsm8k",), "summary": ("xsum",)}
DTYPES = ("auto", "float32", "bfloat16")  # of training: `dtype.choose_dtype` resolves auto, once per machine
FORMS = ("instruction", "cloze")  # how a record becomes a prompt and a response (`examples`)
ENGINES = ("transformers", "slots")  # what decodes an evaluation's greedy answers (`evaluate.text_generator`)
EVAL_MODES = ("generate", "loglik", "text", "nll")  # how `evaluate` scores a data set (its module docstring)
CHOICE_MODES = ("loglik", "text")  # those that score a multiple-choice set's choices: commonsense sets only


def check_evaluation(tasks, mode: str = "generate", engine: str | None = None) -> list[str]:
    """The data sets `tasks` names (families and/or sets), checked against how they are to be scored:
    `mode` one of EVAL_MODES, `engine` as `check_engine` takes it. Without PyTorch, so that a command
    refuses a bad evaluation before its model loads."""
    if mode not in EVAL_MODES:
        raise ValueError(f"mode {mode!r}: choose one of {list(EVAL_MODES)}")
    check_engine(engine, mode)
    datasets = resolve_tasks(tasks)
    others = [d for d in datasets if family_of(d) != "commonsense"]
    if mode in CHOICE_MODES and others:
        raise ValueError(f"mode {mode!r} scores the choices of multiple-choice sets (commonsense) only, not {others}")
    return datasets


def check_engine(engine: str | None, mode: str = "generate") -> None:
    """`engine` (None: the default) one of ENGINES, and given for mode "generate" only."""
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose one of {list(ENGINES)}")
    if engine is not None and mode != "generate":
        raise ValueError(f"engine {engine!r}: an engine decodes the answers of mode 'generate', not mode {mode!r}")


@dataclass
class TrainConfig:
    """Everything that defines a run; written to the output folder and checked on --resume."""

    method: str
    task: str | None  # a built-in mixture (TRAIN_DATASETS), or None with `data`
    output_dir: str
    model: str | None = None
    data_dir: str | None = None
    data: str | None = None  # a user's own data file or `datasets` folder (`fflora.recipes.user_data`)
    r: int = 8
    alpha: float = 16.0
    phi: str = "identity"
    sub_blocks: str = "attn,mlp"
    forward: bool = True
    backward: bool = True
    lora_r: int = 8
    lora_alpha: float = 16.0
    match_params: bool = False
    dropout: float = 0.0
    train_limit: int | None = None
    max_steps: int = -1
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # the gradient's global norm is clipped to this before each step (0: not clipped)
    max_length: int = 256
    seed: int = 42
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 5
    gradient_checkpointing: bool = False
    dev_size: int = 0  # records of the training mixture held out as the dev split (scored after training)
    dtype: str = "auto"  # float32, bfloat16 (autocast), or auto: the faster of the two, measured once per machine
    packing: bool = True  # each batch as one row without padding (False: padded rows, the reference)
    form: str = "instruction"  # "cloze": multiple-choice records as the question, then the answer's text
    max_loss_ratio: float | None = None  # stop as diverged when a logged loss exceeds this x the first one

    def __post_init__(self) -> None:
        # Checked here, before any data is read or model loaded: a bad flag fails in a second.
        for name, flag in (("r", "--rank"), ("lora_r", "--lora-rank"), ("batch_size", "--batch-size"),
                           ("grad_accum", "--grad-accum"), ("max_length", "--max-length"), ("save_steps", "--save-steps"),
                           ("logging_steps", "--logging-steps"), ("save_total_limit", "--save-total-limit")):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, or -1 to train for --epochs; got {self.max_steps}")
        for name, flag, ok in (("lr", "--lr", self.lr > 0), ("alpha", "--alpha", self.alpha > 0),
                               ("lora_alpha", "--lora-alpha", self.lora_alpha > 0), ("epochs", "--epochs", self.epochs > 0),
                               ("dropout", "--dropout", 0 <= self.dropout < 1),
                               ("warmup_ratio", "--warmup-ratio", 0 <= self.warmup_ratio < 1),
                               ("weight_decay", "--weight-decay", self.weight_decay >= 0),
                               ("max_grad_norm", "--max-grad-norm", self.max_grad_norm >= 0)):
            if not ok:
                bound = ("in [0, 1)" if name in ("dropout", "warmup_ratio")
                         else ">= 0" if name in ("weight_decay", "max_grad_norm") else "> 0")
                raise ValueError(f"{flag} must be {bound}, got {getattr(self, name)!r}")
        if self.max_loss_ratio is not None and self.max_loss_ratio <= 1:
            raise ValueError(f"max_loss_ratio must be above 1 (a multiple of the first logged loss), got {self.max_loss_ratio}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if (self.task is None) == (self.data is None):
            raise ValueError("give a built-in task (--task) or your own data (--data FILE_OR_DIR), one of the two")
        if self.task is not None and self.task not in TRAIN_DATASETS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {sorted(TRAIN_DATASETS)}, or train on your own "
                             "data with --data FILE_OR_DIR")
        if self.data is not None and self.form != "instruction":
            raise ValueError(f"form {self.form!r} is for the built-in multiple-choice sets; --data trains in its own "
                             "format (chat, prompt/response or text)")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {list(DTYPES)}")
        if self.form == "cloze" and self.task != "commonsense":
            raise ValueError(f"form 'cloze' trains multiple-choice answers (task commonsense), not {self.task!r}; "
                             "use form 'instruction'")
        if self.form not in FORMS:
            raise ValueError(f"unknown data form {self.form!r}; choose one of {list(FORMS)}")


COMPARED_METHODS = (*method_names(), "lora")


@dataclass(frozen=True)
class CompareSettings:
    methods: tuple[str, ...] = (DEFAULT_METHOD, "lora")
    latency: bool = True
    prompt_len: int = 64
    new_tokens: int = 32
    repeats: int = 3
    compile: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in COMPARED_METHODS]
        if unknown or len(set(self.methods)) != len(self.methods) or len(self.methods) < 2:
            raise ValueError(f"--methods takes two or more of {list(COMPARED_METHODS)}, each once; got {list(self.methods)}")
        for name in ("prompt_len", "new_tokens", "repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(self, name)!r}")
