"""`ServerConfig`: every setting of `fflora serve`, checked before anything loads.

Plain data, without PyTorch: `fflora serve --help` takes its defaults from here. The adapters' names
are checked by `run_server` (`adapter_policy`), the memory the settings take by `memory`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ops.formats import MODES, check_weights

# Prompt tokens per engine step. A prompt longer than this is prefilled over several steps (chunked
# prefill), so one long prompt pauses the running streams for one chunk at a time. Measured on
# SmolLM2-135M, 2 cores, fp32, under the server's former engine (transformers' continuous batching;
# benchmarks/serve_limits.py, results/serve-limits/): a 3000-token prompt stretched a running stream's
# longest gap by 0.54 s at 256, 1.39 s at 512, 2.08 s at 1024 and 7.41 s at 8192, while 30 concurrent
# streams ran at 112, 113, 115 and 117 tokens/s: 256 keeps the stall under a second for 4% of throughput.
DEFAULT_MAX_BATCH_TOKENS = 256
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SLOT_LEN_CAP = 4096  # default positions per KV slot, where the model takes more


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
    max_num_seqs: int = 8  # KV slots: requests decoding at once
    max_model_len: int | None = None  # positions per slot (None: the model's, at most SLOT_LEN_CAP)
    gemm_plan: str = "auto"  # how the fused GEMMs run (fflora.fastpath.plan), measured at start for 1 and max_num_seqs rows
    compile: bool = False  # decode steps through one torch.compile graph (any batch size), compiled at start
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
        for name in ("max_adapters", "default_max_tokens", "max_batch_tokens", "limit_max_requests", "rank_budget",
                     "max_request_bytes", "max_queued_requests", "max_num_seqs", "max_model_len", "max_queued_tokens",
                     "timeout_keep_alive_s", "header_timeout_s", "shutdown_timeout_s"):
            value, bound = getattr(self, name), "> 0" if name.endswith("timeout_s") and name != "timeout_keep_alive_s" else ">= 1"
            if value is not None and not value > 0:
                raise ValueError(f"--{name.removesuffix('_s').replace('_', '-')} must be {bound}, got {value}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535 (0: a free one, said at start), got {self.port}")
        check_weights(self.weights)
        if self.gemm_plan not in MODES:
            raise ValueError(f"--gemm-plan must be one of {list(MODES)}, got {self.gemm_plan!r}")
        if any(not key.strip() for key in self.api_keys):
            raise ValueError("--api-key must not be empty")
        if len(self.adapters) > self.max_adapters:
            raise ValueError(f"{len(self.adapters)} adapters do not fit in --max-adapters {self.max_adapters}")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    def hosts(self) -> list[str] | None:
        """The Host header values to answer (None: any)."""
        if self.allowed_hosts:
            return list(self.allowed_hosts)
        return list(LOOPBACK_HOSTS) if self.loopback else None


