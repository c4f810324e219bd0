"""The benchmarks' settings: one dataclass per `fflora bench` suite, checked when made.

Plain data, without PyTorch: the command line takes its defaults and help from them (`fflora bench
--help` imports no torch), and a bad option fails before any model loads. The benchmarks that run
them: `latency`, `bank`, `serve`, `train`, `formats`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ops.formats import MODES, WEIGHT_FORMATS, check_weights
from ..utils.method_names import method_names

# Every configuration `fflora bench` times: the base model and LoRA (the peers) and each fflora method's
# forms: "<method>_unfused" (training form), "_fused", "_fused_fast" (GEMM plan), "_fused_compiled".
METHOD_FORMS = ("unfused", "fused", "fused_fast", "fused_compiled")
CONFIGS = ("base", "base_compiled", "fused_base", "fused_base_fast", "fused_base_compiled", "lora_unmerged",
           "lora_unmerged_compiled", "lora_merged", *(f"{m}_{form}" for m in method_names() for form in METHOD_FORMS))


@dataclass
class BenchSettings:
    prompt_len: int = 128
    new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = 5
    warmup: int = 1
    rank: int = 8  # of FFBA and zFLoRA
    lora_rank: int | None = None  # None: the LoRA rank whose budget is closest to FFBA's
    threads: int | None = None
    train_steps: int = 3
    train_batch: int = 4
    train_len: int = 128
    seed: int = 0
    configs: tuple[str, ...] = CONFIGS
    gemm_plan: str = "auto"  # of the "_fast" and "_compiled" configurations (plan_gemms, tuned per batch size)
    compile_freezing: bool = False  # the "_compiled" configurations with inductor's freezing pass

    def __post_init__(self) -> None:
        check_sizes(self, lists=("batch_sizes",), positive=("prompt_len", "new_tokens", "repeats", "rank", "train_steps",
                                                            "train_batch", "train_len"),
                    optional=("lora_rank", "threads"))
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        unknown = [c for c in self.configs if c not in CONFIGS]
        if unknown or not self.configs:
            raise ValueError(f"configs must be among {list(CONFIGS)}, got {list(self.configs)}")
        if "base" not in self.configs:
            raise ValueError(f"configs must include 'base' (every ratio is to it), got {list(self.configs)}")
        if self.gemm_plan not in MODES:
            raise ValueError(f"gemm-plan must be one of {list(MODES)}, got {self.gemm_plan!r}")


def check_sizes(settings, lists: tuple[str, ...] = (), positive: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> None:
    """ValueError, naming the command-line option, unless every field in `lists` is a non-empty list of
    integers >= 1, every field in `positive` an integer >= 1 and every field in `optional` None or >= 1."""
    def bad(v) -> bool:
        return isinstance(v, bool) or not isinstance(v, int) or v < 1

    for name in lists:
        values = list(getattr(settings, name))
        if not values or any(bad(v) for v in values):
            raise ValueError(f"{name.replace('_', '-')} must be integers >= 1, got {values}")
    for name in (*positive, *optional):
        value = getattr(settings, name)
        if not (value is None and name in optional) and bad(value):
            raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")


MIXES = ("identical", "uniform", "zipf", "distinct")


@dataclass
class BankBenchSettings:
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    resident: tuple[int, ...] = (1, 2, 4, 8, 16)
    mixes: tuple[str, ...] = MIXES
    rank: int = 8
    lora_rank: int | None = None  # None: the LoRA rank whose budget is closest to FFBA's
    prompt_len: int = 32
    steps: int = 8  # timed decode steps per method and round
    rounds: int = 3  # interleaved rounds per cell (after one untimed step per method)
    zipf_alpha: float = 1.5
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_sizes(self, lists=("batch_sizes", "resident"), positive=("rank", "prompt_len", "steps", "rounds"),
                    optional=("lora_rank", "threads"))
        self.batch_sizes, self.resident = tuple(sorted(set(self.batch_sizes))), tuple(sorted(set(self.resident)))
        unknown = [m for m in self.mixes if m not in MIXES]
        if unknown or not self.mixes:
            raise ValueError(f"mixes must be among {list(MIXES)}, got {list(self.mixes)}")


DISTRIBUTIONS = ("uniform", "powerlaw", "round-robin")  # how requests draw their adapters (`bench.serve.workload`)


@dataclass
class ServeBenchSettings:
    adapters: tuple[int, ...] = (1, 4, 16)
    distributions: tuple[str, ...] = ("uniform", "powerlaw")
    rate: float = 2.0  # requests per second
    requests: int = 32  # per cell and mode
    prompt_len: tuple[int, int] = (32, 128)
    output_len: tuple[int, int] = (16, 64)
    rounds: int = 2
    rank: int = 8
    powerlaw_alpha: float = 1.0
    seed: int = 0
    vllm_python: str | None = ".venv-vllm/bin/python"  # the vLLM peer's interpreter (`make vllm-venv`); None: no peer
    dtype: str = "float32"  # every server's (fflora serve --dtype, vLLM --dtype)
    weights: str | None = None  # fflora serve --weights (its fused weights' format; None: the dtype's)
    compile: bool = False  # fflora serve --compile
    # seconds each cell waits before it runs, so that its server has the CPU to itself: vLLM's CPU build keeps
    # about one core busy for a few seconds after a burst (1.0 core-second in the 5 s after 8 requests, then
    # 0.02 a second), and the cell after it ran 20% slower
    settle_s: float = 5.0

    def __post_init__(self) -> None:
        check_sizes(self, lists=("adapters", "prompt_len", "output_len"), positive=("requests", "rounds", "rank"))
        self.adapters = tuple(sorted(set(self.adapters)))
        for name in ("prompt_len", "output_len"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name.replace('_', '-')} takes MIN MAX with MIN <= MAX, got {low} {high}")
        if not self.settle_s >= 0:
            raise ValueError(f"settle_s must be >= 0 seconds, got {self.settle_s}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests per second, got {self.rate}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16 (what both fflora and vLLM's CPU build run), got {self.dtype!r}")
        check_weights(self.weights)
        unknown = [d for d in self.distributions if d not in DISTRIBUTIONS]
        if unknown or not self.distributions:
            raise ValueError(f"distributions must be among {list(DISTRIBUTIONS)}, got {list(self.distributions)}")


@dataclass
class TrainBenchSettings:
    forms: tuple[str, ...] = ("instruction", "cloze")
    rank: int = 10  # FFBA r = 10: the first study's budget (LoRA r = 8)
    batch_size: int = 8
    max_length: int = 256
    steps: int = 6  # timed batches per configuration and form (after one untimed warm-up batch)
    curve_steps: int = 40  # steps of each of the two real runs (0: skip them)
    curve_form: str = "cloze"
    lr: float = 1e-3
    seed: int = 0
    model: str | None = None
    data_dir: str | None = None

    def __post_init__(self) -> None:
        check_sizes(self, positive=("rank", "batch_size", "max_length", "steps"))
        if self.curve_steps < 0:
            raise ValueError(f"curve-steps must be >= 0, got {self.curve_steps}")


FFLORA_KINDS = ("fused_base", *(f"{m}_fused" for m in method_names()), "bank_fused")
PEER_KINDS = ("base_compiled", "lora_unmerged_compiled")  # stock transformers and PEFT, compiled
KINDS = FFLORA_KINDS + PEER_KINDS


@dataclass
class FormatsBenchSettings:
    formats: tuple[str, ...] = WEIGHT_FORMATS
    kinds: tuple[str, ...] = KINDS
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    rank: int = 8
    lora_rank: int | None = None  # None: the LoRA rank whose budget is closest to FFBA's
    compile: bool = True
    cpp_wrapper: bool = False  # inductor's C++ wrapper, for fflora's models and the compiled peers alike
    gemm_plan: str = "auto"  # of fflora's models, planned for each batch size (plan_gemms)
    seed: int = 0
    adapter: str | None = None  # a trained FFBA adapter folder (None: a random adapter of rank `rank`)
    dev_task: str = "commonsense"
    dev_form: str = "cloze"
    dev_size: int = 200
    data_dir: str | None = None
    llama_cpp: bool = True  # the llama.cpp rows, where llama-cpp-python is installed and the model has a GGUF
    gguf: str | None = None  # the model as a GGUF file (None: an embedded model's own)

    def __post_init__(self) -> None:
        self.formats, self.kinds, self.batch_sizes = tuple(self.formats), tuple(self.kinds), tuple(self.batch_sizes)
        for weights in self.formats:
            check_weights(weights)
        if "float32" not in self.formats:
            raise ValueError("formats must include 'float32' (agreement is measured against it)")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be among {list(KINDS)}, got {list(self.kinds)}")
        check_sizes(self, lists=("batch_sizes",), positive=("prompt_len", "new_tokens", "repeats", "rank"),
                    optional=("lora_rank",))
        if self.gemm_plan not in MODES:
            raise ValueError(f"gemm-plan must be one of {list(MODES)}, got {self.gemm_plan!r}")
