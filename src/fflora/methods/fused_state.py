"""Where a fused model keeps its `FusedModel` (`fflora.methods.fused_model`): one plain attribute.

The lower modules that need to know whether a model is fused (its fingerprint, its bank, the PEFT
tuner, removing an adapter) look it up here, without importing the class that fuses.
"""

from __future__ import annotations

from torch import nn

ATTRIBUTE = "fflora_fused"


def fused_model_of(model: nn.Module):
    """The model's `FusedModel`, or None if it is not fused."""
    return getattr(model, ATTRIBUTE, None)


def attach(model: nn.Module, fused) -> None:
    """Set (or, with None, drop) the model's `FusedModel`: a plain attribute, not a submodule (it holds
    no parameters of its own)."""
    if fused is None:
        model.__dict__.pop(ATTRIBUTE, None)
    else:
        object.__setattr__(model, ATTRIBUTE, fused)
