"""`ServerConfig`: every setting of `fflora serve`, checked before anything loads, and the memory
those settings will take."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..methods.weight_formats import check_weights
from ..models.footprint import tensor_bytes
from .adapter_policy import adapter_name_problem
from .http_guards import LOOPBACK_HOSTS

# Tokens per engine step. A prompt longer than this is prefilled over several steps (chunked
# prefill), so one long prompt pauses the running streams for one step at a time. Measured on
# SmolLM2-135M, 2 cores, fp32 (benchmarks/serve_limits.py, results/serve-limits/): a 3000-token
# prompt stretched a running stream's longest gap by 0.54 s at 256, 1.39 s at 512, 2.08 s at 1024
# and 7.41 s at 8192 (transformers' default), while 30 concurrent streams ran at 112, 113, 115 and
# 117 tokens/s: 256 keeps the stall under a second for 4% of throughput.
DEFAULT_MAX_BATCH_TOKENS = 256
PAGE_SIZE = 256  # tokens per KV-cache page (transformers' default)


@dataclass
class ServerConfig:
    """Settings of `fflora serve` (the CLI's options; see `fflora serve --help`)."""

    model: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # loaded at start: name -> folder (any path)
    max_adapters: int = 8
    rank_budget: int | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    dtype: str = "float32"
    weights: str | None = None  # the fused weights' format (fflora.methods.weight_formats); None: dtype's
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_batch_requests: int | None = None
    kv_cache_tokens: int = 32768
    default_max_tokens: int = 256
    limit_max_requests: int | None = None
    log_level: str = "info"
    api_keys: list[str] = field(default_factory=list)
    enable_adapter_loading: bool = False  # runtime load/unload; only from below adapter_roots
    adapter_roots: list[str] = field(default_factory=list)
    allowed_hosts: list[str] | None = None  # None: the loopback names when bound to loopback, else any
    allow_base_mismatch: bool = False  # for the adapters loaded at start
    max_request_bytes: int = 1 << 20
    max_queued_requests: int = 128
    max_queued_tokens: int = 65536
    timeout_keep_alive_s: int = 5
    header_timeout_s: float = 30.0
    shutdown_timeout_s: float = 30.0  # on SIGTERM: how long running requests may still take

    def __post_init__(self) -> None:
        for name in ("max_adapters", "kv_cache_tokens", "default_max_tokens", "max_batch_tokens", "max_batch_requests",
                     "limit_max_requests", "rank_budget", "max_request_bytes", "max_queued_requests",
                     "max_queued_tokens", "timeout_keep_alive_s", "header_timeout_s", "shutdown_timeout_s"):
            value, bound = getattr(self, name), "> 0" if name.endswith("timeout_s") and name != "timeout_keep_alive_s" else ">= 1"
            if value is not None and not value > 0:
                raise ValueError(f"--{name.removesuffix('_s').replace('_', '-')} must be {bound}, got {value}")
        if self.kv_cache_tokens < PAGE_SIZE:
            raise ValueError(f"--kv-cache-tokens {self.kv_cache_tokens} is below one page of the KV cache ({PAGE_SIZE} "
                             f"tokens); give at least {PAGE_SIZE}: it bounds every request's prompt plus completion")
        check_weights(self.weights)
        if any(not key.strip() for key in self.api_keys):
            raise ValueError("--api-key must not be empty")
        if len(self.adapters) > self.max_adapters:
            raise ValueError(f"{len(self.adapters)} adapters do not fit in --max-adapters {self.max_adapters}")
        for adapter in self.adapters:
            problem = adapter_name_problem(adapter, self.served_model_name or "")
            if problem:
                raise ValueError(f"--adapter {adapter!r}: {problem}")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    def hosts(self) -> list[str] | None:
        """The Host header values to answer (None: any)."""
        if self.allowed_hosts:
            return list(self.allowed_hosts)
        return list(LOOPBACK_HOSTS) if self.loopback else None


def memory_estimate(model: nn.Module, cfg: ServerConfig, runtime: int = 0) -> dict[str, int]:
    """Bytes the server will hold, from the fused model and the settings: the weights (measured on the
    model), the paged KV cache, one engine step's largest temporaries (its logits, over every token of
    the step, and the MLP's activations), and `runtime` (what the process held before the model)."""
    weights = tensor_bytes(model)
    text = model.config.get_text_config()
    element = next(model.parameters()).element_size()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    pages = -(-cfg.kv_cache_tokens // PAGE_SIZE)
    kv_cache = pages * PAGE_SIZE * text.num_hidden_layers * 2 * kv_heads * head_dim * element
    step = cfg.max_batch_tokens * (text.vocab_size * 4 + 3 * text.intermediate_size * element)  # fp32 logits
    return {"runtime": runtime, "weights": weights, "kv_cache": kv_cache, "step": step,
            "total": runtime + weights + kv_cache + step}


def describe_memory(estimate: dict[str, int], cfg: ServerConfig) -> str:
    gb = {k: v / 1e9 for k, v in estimate.items()}
    return (f"memory: about {gb['total']:.2f} GB = runtime {gb['runtime']:.2f} + weights {gb['weights']:.2f} + KV cache "
            f"{gb['kv_cache']:.2f} ({cfg.kv_cache_tokens} tokens, --kv-cache-tokens) + one step's work {gb['step']:.2f} "
            f"({cfg.max_batch_tokens} tokens, --max-batch-tokens)")
