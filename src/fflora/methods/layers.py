"""What every method's training form shares: PEFT's on/off switch, the projection wrapper, parameter
initialisation and the small GEMM an adapter runs in its own dtype.

PEFT's `PeftModel.disable_adapter()` and `get_model_status()` walk the model for `BaseTunerLayer`
modules and toggle `enable_adapters`. LoRA's layers wrap one `nn.Linear` each, keyed by adapter name;
fflora's adapter modules (an FFBA sub-block's FA and BA, a zFLoRA sub-block's read and write, zFLoRA's
head merge) span several projections and hold one adapter each, so they take only the switch
(`AdapterSwitch`): the training-form projections skip an adapter whose `disable_adapters` is set.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

ADAPTER_NAME = "default"  # PEFT's name for the one adapter a model holds in training form
BASE_NAME = "__base__"  # PEFT's name for "no adapter" in a mixed batch (`adapter_names=`)


class AdapterSwitch(BaseTunerLayer):
    """Mixed into an fflora adapter module (before `nn.Module`): PEFT's on/off switch and status."""

    adapter_layer_names: tuple[str, ...] = ()  # fflora's parameters are plain attributes, not per-name dicts
    _active_adapter = ADAPTER_NAME

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the adapter on or off; its parameters keep their requires_grad."""
        self._disable_adapters = not enabled


class WrappedProjection(nn.Module):
    """A training-form projection: the base nn.Linear, as loaded, is `self.base` (every method)."""

    base: nn.Linear


def refer_to(module: nn.Module, name: str, other: nn.Module | None) -> None:
    """Keep a plain reference to `other`, not a submodule: its parameters belong to the layer's adapter
    container (one canonical name each), however many projections use them."""
    object.__setattr__(module, name, other)


def require_linear(module: nn.Module, path: str) -> nn.Linear:
    """`module` if it is a plain nn.Linear; a ValueError naming `path` and the fix otherwise."""
    if type(module) is not nn.Linear:
        raise ValueError(
            f"fflora adapts plain torch.nn.Linear projections, but {path} is a {type(module).__name__}; "
            "load the base model unquantized (e.g. dtype=torch.bfloat16) before applying an adapter"
        )
    return module


def row_slices(widths: tuple[int, ...]) -> tuple[slice, ...]:
    """The row range of each input projection (in `ArchitectureSpec` order) in a matrix that stacks
    one block per input projection."""
    ends = [sum(widths[: i + 1]) for i in range(len(widths))]
    return tuple(slice(end - w, end) for end, w in zip(ends, widths))


def kaiming(rows: int, cols: int, dtype, device) -> nn.Parameter:
    """A down-projection's start: nn.Linear's and LoRA's Kaiming-uniform init for A."""
    weight = torch.empty(rows, cols, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return nn.Parameter(weight)


def zeros(rows: int, cols: int, dtype, device) -> nn.Parameter:
    """An up-projection's start: zero, so that a fresh adapter leaves the model unchanged."""
    return nn.Parameter(torch.zeros(rows, cols, dtype=dtype, device=device))


def adapter_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T computed in the adapter's dtype (adapters may be fp32 on a half-precision base)."""
    return F.linear(x.to(weight.dtype), weight)


def canonical_sub_block_key(name: str, container: str) -> str | None:
    """`layers.{i}.{attn|mlp}.{param}` for a parameter name `...layers.{i}.{container}.{attn|mlp}.{param}`
    (any prefix: PEFT's `base_model.model.`, the model's own), or None. `container`: the attribute a
    method's adapters hang on in each decoder layer ("ffba", "zflora")."""
    found = re.search(rf"(?:^|\.)layers\.(\d+)\.{container}\.(attn|mlp)\.(\w+)$", name)
    return f"layers.{found[1]}.{found[2]}.{found[3]}" if found else None
