"""The bytes a model's tensors hold: what a decode step reads, what a server keeps resident; and the
process's peak resident memory (what the demo and the server report)."""

from __future__ import annotations

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
