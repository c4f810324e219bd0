"""How one weight's GEMM runs: its memory layout and, per number of input rows, the operand order.

`y = x W^T` (x: rows x in, W: out x in) can run as `F.linear(x, W)` ("xw") or as `(W x^T)^T`
("wx"), and W can be stored row-major ("standard", as nn.Linear keeps it) or column-major
("transposed"). The values are the same; the BLAS kernels that run are not, and at the small row
counts of decoding their speed differs by up to 2.5x in either direction depending on the shape,
the row count and the CPU. A third layout, "packed", keeps the row-major weight and beside it a copy
in oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's freezing pass
gives CPU linears), run by oneDNN's linear for every row count: on an AVX-512 EPYC with 2 threads,
SmolLM2's decode GEMMs at 8 rows streamed 32 GB/s that way in float32 against 15 for the best BLAS
order (30 against 20 in bfloat16). It costs a second copy of the weight. Dynamo cannot hold oneDNN's
opaque tensors, so the packed copies live in a table here and a module holds its copy's handle: the
operator `fflora::packed_linear` (`ops.library`) takes the handle, so eager and compiled steps run the
same kernel, and packing a module again (its weight was written: an adapter loaded) keeps its handle
and every compiled graph that uses it. `fflora.fastpath.plan` measures and picks; this module runs the choice
(`planned_linear`) and applies it to a module (`set_gemm_plan`).
"""

from __future__ import annotations

import copy
import itertools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.classes import extend, restore
from .library import define_op


@dataclass(frozen=True)
class GemmPlan:
    """The layout a weight is stored in, and the operand order for each measured row count.

    A call with a row count that was not measured takes the order of the nearest measured one, up
    to twice the largest; beyond that (prefill) it runs "xw", F.linear's usual path. A plan of one
    row count gives its order to every count up to twice it without comparing them: what a compiled
    graph over a dynamic number of rows needs (a serving engine's decode step), where each comparison
    would tie the graph to a range of row counts.
    """

    layout: str
    orders: tuple[tuple[int, str], ...] = ()  # (rows, order), rows ascending

    def order(self, rows: int) -> str:
        if not self.orders or rows > 2 * self.orders[-1][0]:
            return "xw"
        nearest = self.orders[0]  # the nearest measured row count, the smaller on a tie (Dynamo traces this loop)
        for measured in self.orders[1:]:
            if abs(measured[0] - rows) < abs(nearest[0] - rows):
                nearest = measured
        return nearest[1]


def laid_out(weight: Tensor, layout: str) -> Tensor:
    """`weight` (out x in) with the same values, stored row-major ("standard") or column-major ("transposed")."""
    if layout == "standard":
        return weight.contiguous()
    return weight.t().contiguous().t()


def layout_of(weight: Tensor) -> str:
    return "transposed" if weight.stride(0) == 1 and weight.shape[0] > 1 else "standard"


def packable(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether oneDNN's packed linear runs weights of `dtype` on `device` here (the "packed" layout: CPU only)."""
    return (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and dtype in (torch.float32, torch.bfloat16))


def packed(weight: Tensor, rows: int) -> Tensor:
    """`weight` (out x in) in oneDNN's blocked layout, chosen for inputs of `rows` rows (any row count runs)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows)


def onednn_linear(x: Tensor, packed_weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ W^T + bias by oneDNN, W given `packed` (what the packed layout runs)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


_PACKED: dict[int, Tensor] = {}  # handle -> a module's packed copy (see the module docstring)
_HANDLES = itertools.count()


def _packed_linear(x: Tensor, handle: int, out_features: int, bias: Tensor | None = None) -> Tensor:
    """x @ W^T + bias by oneDNN, W the packed copy under `handle` (`out_features` rows)."""
    return onednn_linear(x, _PACKED[handle], bias)


packed_linear = define_op("packed_linear(Tensor x, int handle, int out_features, Tensor? bias=None) -> Tensor",
                          _packed_linear, lambda x, handle, out_features, bias=None: x.new_empty((*x.shape[:-1], out_features)))


def _pack(module: nn.Module, rows: int) -> None:
    """Pack `module.weight` for `rows` rows under the module's handle (a new one if it has none)."""
    handle = module.__dict__.get("packed_handle")
    if handle is None:
        _register(module, packed(module.weight, rows))
    else:
        _PACKED[handle] = packed(module.weight, rows)


def _register(module: nn.Module, copy_: Tensor) -> None:
    """Give `module` a new handle to `copy_`, freed with the module."""
    handle = module.packed_handle = next(_HANDLES)
    _PACKED[handle] = copy_
    weakref.finalize(module, _PACKED.pop, handle, None)


def _unpack(module: nn.Module) -> None:
    handle = module.__dict__.pop("packed_handle", None)
    if handle is not None:
        _PACKED.pop(handle, None)


def planned_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, plan: GemmPlan | None = None,
                   packed_handle: int | None = None) -> Tensor:
    """F.linear(x, weight, bias), run in the operand order `plan` picks for x's number of rows, or by
    oneDNN's linear on the packed copy of `weight` under `packed_handle` (the "packed" layout)."""
    if packed_handle is not None:
        return packed_linear(x, packed_handle, weight.shape[0], bias)
    if plan is not None:
        rows = x.numel() // x.shape[-1]
        if plan.order(rows) == "wx":
            xt = x.reshape(rows, x.shape[-1]).t()
            out = torch.mm(weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), weight, xt)
            return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class HoldsPackedCopy:
    """What a module that may hold a packed copy (`packed_handle`) mixes in: a deep copy of it gets a handle
    of its own (to the same copy, which packing replaces, never changes), so that neither module's
    packing again, nor its end, reaches the other."""

    def __deepcopy__(self, memo):
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            if key != "packed_handle":
                clone.__dict__[key] = copy.deepcopy(value, memo)
        if "packed_handle" in self.__dict__:
            _register(clone, _PACKED[self.__dict__["packed_handle"]])
        return clone


class PlannedLinear(HoldsPackedCopy, nn.Linear):
    """An nn.Linear (the LM head) that follows `gemm_plan`. Set by swapping the module's class
    (`fflora.utils.classes`), so the module, its parameters and their ties (the LM head is often the
    embedding matrix) stay the same."""

    _fflora_base_class = nn.Linear  # utils.classes.BASE
    gemm_plan: GemmPlan | None = None
    packed_handle: int | None = None  # the "packed" layout's copy (`set_gemm_plan`)

    def forward(self, x: Tensor) -> Tensor:
        return planned_linear(x, self.weight, self.bias, self.gemm_plan, self.packed_handle)


def set_gemm_plan(module: nn.Module, plan: GemmPlan | None) -> None:
    """Store `module.weight` in the plan's layout and make the module run it (None: row-major, F.linear).
    `module` is a fused GEMM (it reads `gemm_plan` and `packed_handle`) or a plain nn.Linear LM head (its
    class is swapped)."""
    layout = plan.layout if plan is not None else "standard"
    if layout == "packed":  # row-major, and the packed copy beside it, for the largest row count planned
        _pack(module, max((rows for rows, _ in plan.orders), default=1))
        layout = "standard"
    else:
        _unpack(module)
    if layout_of(module.weight) != layout:
        if isinstance(module.weight, nn.Parameter):  # the LM head: keep the Parameter (and its ties)
            module.weight.data = laid_out(module.weight.data, layout)
        else:
            module.weight = laid_out(module.weight, layout)
    if isinstance(module, nn.Linear):  # the LM head
        if plan is None:
            restore(module)
        elif type(module) is nn.Linear:
            extend(module, PlannedLinear)
        if plan is None:
            module.__dict__.pop("gemm_plan", None)
            return
    module.gemm_plan = plan
