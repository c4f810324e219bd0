"""`FusedState`: everything fflora knows about a fused model, in one object attached once.

What is fused (the method, or None for the plain base), the adapter bank, the GEMM modules and the
plan they follow (`fflora.fastpath.plan`), and the compiled decode step (`fflora.fastpath.compile`):
fusing creates it, fastpath fills in its part, unfusing undoes the fast path through it and drops
it. Kept as a plain attribute (`model.fflora_fused`), not a submodule: it holds no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops.gemm import set_gemm_plan
from .interface import Method

ATTRIBUTE = "fflora_fused"


@dataclass
class FusedState:
    """method: the `Method` whose fused form is installed (None: the plain base, fused); bank: the
    adapter bank, if fused with one; gemms: every fused GEMM module (what a GEMM plan covers, with
    the LM head); gemm_mode: the plan's mode ("standard": F.linear on row-major weights); planned:
    the modules whose plan is not the standard one; compiled: the generation settings from before
    `compile_decode` (None: not compiled); weights: the weight format (`weight_formats`); dtype: the
    model's dtype before fusing; fingerprint: the base weights' fingerprint from before they were
    quantized (None: computed from the weights)."""

    method: Method | None = None
    bank: object | None = None  # the method's bank (FFBA's `AdapterBank`): this module knows no method
    gemms: list[nn.Module] = field(default_factory=list)
    gemm_mode: str = "standard"
    planned: list[nn.Module] = field(default_factory=list)
    compiled: tuple | None = None
    weights: str = "float32"
    dtype: torch.dtype = torch.float32
    fingerprint: str | None = None

    def undo_fast_path(self, model: nn.Module) -> None:
        """The model's own generation settings again and every GEMM standard (F.linear, row-major)."""
        if self.compiled is not None:
            config = model.generation_config
            config.cache_implementation, config.compile_config = self.compiled
            self.compiled = None
        for module in self.planned:
            set_gemm_plan(module, None)
        self.planned, self.gemm_mode = [], "standard"
        drop_compiled_step(model)


def fused_state(model: nn.Module) -> FusedState | None:
    """The model's `FusedState`, or None if it is not fused."""
    return getattr(model, ATTRIBUTE, None)


def attach(model: nn.Module, state: FusedState | None) -> None:
    """Set (or, with None, drop) the model's `FusedState`."""
    if state is None:
        model.__dict__.pop(ATTRIBUTE, None)
    else:
        object.__setattr__(model, ATTRIBUTE, state)


def require_fused(model: nn.Module, message: str) -> FusedState:
    """The model's `FusedState`; a ValueError with `message` (what needs it, and `fflora.fuse`) if there is none."""
    state = fused_state(model)
    if state is None:
        raise ValueError(message)
    return state


def drop_compiled_step(model: nn.Module) -> None:
    """Forget transformers' cached compiled forward (it is built again, from the current model, when next
    needed): after the GEMMs changed layout, or when the compile settings changed."""
    model.__dict__.pop("_compiled_call", None)
    model.__dict__.pop("_last_compile_config", None)
