"""llama.cpp as a peer: what CPU users run instead, on the very GGUF file an embedded model comes from.

Optional: `make bench-peers` installs `llama-cpp-python` (it builds llama.cpp from source, about ten
minutes once); without it `available()` says why and the bench leaves the rows out, saying so.
The shipped GGUF is converted once per type with llama.cpp's own quantizer (`llama_model_quantize`,
allowing requantization: from the shipped Q4_1 to F32, F16 and Q8_0 it dequantizes, then quantizes)
and cached beside it. Decoding is timed as `fflora bench` times fflora: one sequence (llama-cpp-python's
`Llama` decodes one), the same prompt token ids, greedy, TTFT the prefill and the first token, TPOT the
mean of the following steps.

On CPUs with AMX (Intel Sapphire Rapids and later) llama.cpp's AMX matrix kernels, which it picks for its
"extra" weight buffers, crash here (a segmentation fault in `ggml_backend_amx_mul_mat`, llama.cpp as
vendored by llama-cpp-python 0.3.36); there the peer runs with `use_extra_bufts` off, as llama.cpp's own
`--no-repack` does, and the report says so (`extra_buffers`).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np

try:
    import llama_cpp
except ImportError:  # optional peer
    llama_cpp = None

from ..utils.sources import say

# fflora weight format -> the nearest llama.cpp file type, and that type's llama_ftype number.
NEAREST = {"float32": "F32", "bfloat16": "F16", "int8": "Q8_0", "int4": "Q4_1"}
FTYPES = {name: gguf.LlamaFileType[("ALL_" if name == "F32" else "MOSTLY_") + name].value for name in NEAREST.values()}


def extra_buffers_work() -> bool:
    """Whether llama.cpp may use its extra weight buffers (repacked / AMX kernels) here: not with AMX."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "amx_int8" not in flags


def available() -> str | None:
    """None when llama.cpp can run here, else why not (for the bench's report)."""
    if llama_cpp is None:
        return "llama-cpp-python is not installed (`make bench-peers` installs it)"
    return None


def converted(source: Path, file_type: str) -> Path:
    """`source` converted to `file_type` (one of `FTYPES`) by llama.cpp's quantizer, cached beside it as
    <stem>.<file_type>.gguf (written under a temporary name, then renamed)."""
    if file_type not in FTYPES:
        raise ValueError(f"llama.cpp file type must be one of {list(FTYPES)}, got {file_type!r}")
    target = source.with_name(f"{source.stem}.{file_type}.gguf")
    if target.is_file():
        return target
    say(f"converting {source.name} to llama.cpp {file_type}")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its per-tensor log lines
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = FTYPES[file_type], True, 0
    partial = target.with_suffix(".partial")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
    if status != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not convert {source} to {file_type} (status {status})")
    partial.replace(target)
    return target


def file_type(path: Path) -> str:
    """The llama.cpp file type a GGUF names itself (general.file_type), e.g. "Q4_1" or "Q4_K_M"."""
    field = gguf.GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return "unknown"
    return gguf.LlamaFileType(int(field.contents())).name.removeprefix("ALL_").removeprefix("MOSTLY_")


def weight_bytes(path: Path) -> int:
    """Bytes of weights a decode step reads from a GGUF file: every tensor but the token embedding table
    (one row per token), unless the file has no separate output matrix (the head is the table)."""
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    table = tensors.get("token_embd.weight", 0) if "output.weight" in tensors else 0
    return sum(tensors.values()) - table


@contextmanager
def _model_params(**fields):
    """`llama_cpp.Llama` has no argument for some model parameters (`use_extra_bufts`): while this is
    open, the defaults it starts from carry `fields`."""
    module = llama_cpp.llama_cpp  # what llama_cpp.Llama calls
    default = module.llama_model_default_params

    def params():
        p = default()
        for name, value in fields.items():
            setattr(p, name, value)
        return p

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = default


class LlamaCpp:
    """One GGUF file loaded by llama.cpp, on `threads` threads, for contexts of up to `n_ctx` tokens;
    `logits_all` keeps every position's logits (for `argmax`; decoding keeps only what it samples)."""

    def __init__(self, path: Path, threads: int, n_ctx: int, extra_buffers: bool, logits_all: bool = False):
        self.path = path
        with _model_params(use_extra_bufts=extra_buffers):
            self.llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                       n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all, verbose=False)

    def time_generation(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        """(TTFT, TPOT) in seconds of greedy decoding `new_tokens` tokens after `prompt` (the prompt
        evaluated afresh: `reset` first, or llama-cpp-python would reuse the previous run's prefix)."""
        self.llm.reset()
        stamps = [time.perf_counter()]
        tokens = self.llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
        for _, _token in zip(range(new_tokens), tokens):
            stamps.append(time.perf_counter())
        tokens.close()
        ttft = stamps[1] - stamps[0]
        return ttft, (stamps[-1] - stamps[1]) / max(len(stamps) - 2, 1)

    def argmax(self, ids: list[int]) -> np.ndarray:
        """The teacher-forced next-token argmax at every position of `ids` (needs `logits_all`)."""
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[: len(ids)].argmax(-1)

    def close(self) -> None:
        self.llm.close()


def teacher_forced_argmax(path: Path, ids: list[int], threads: int, extra_buffers: bool) -> np.ndarray:
    """`LlamaCpp.argmax` of `ids` on a context of their length, loaded for it and closed after."""
    model = LlamaCpp(path, threads, len(ids), extra_buffers, logits_all=True)
    try:
        return model.argmax(ids)
    finally:
        model.close()
