"""The bytes a model's tensors hold: what a decode step reads, what a server keeps resident; the
process's peak resident memory (what the demo and the server report), and giving freed memory back."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import resource
import sys
from collections.abc import Iterable

from torch import Tensor, nn


def _key(t: Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.data_ptr(), t.numel()


def tensor_bytes(model: nn.Module, leave_out: Iterable[Tensor] = ()) -> int:
    """Bytes of the distinct parameters and buffers (tied weights once), but those in `leave_out`."""
    seen, total = {_key(t) for t in leave_out}, 0
    for t in [*model.parameters(), *model.buffers()]:
        key = _key(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def peak_resident_bytes() -> int:
    """The process's peak resident memory so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, another system); looked up once (find_library
    runs a subprocess)."""
    libc = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def release_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the system (glibc's malloc_trim; elsewhere
    nothing more). Between the stages of a long job (the demo, a benchmark), so the activations of
    one stage, freed but kept by the allocator, do not add to the next stage's resident memory."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
