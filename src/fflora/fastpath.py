"""The decode fast path of fused models: how the fused GEMMs store their weights, chosen by measurement.

A fused model owns every base projection GEMM, so it can choose their memory layout. `F.linear`
computes x @ W^T; with W stored row-major (out x in, "standard", as nn.Linear does) the BLAS call
reads W transposed, with W stored column-major ("transposed": the in x out matrix W^T is
contiguous) it reads it as is. Which one is faster depends on the CPU, its BLAS path and the shape
(one AVX2 EPYC measured 11-12 GB/s for the standard layout and 15-17 GB/s for the transposed one on
SmolLM2's decode GEMVs), so `set_gemm_layout(model, "auto")` times both for each distinct GEMM shape
at the decode batch size and keeps the faster.

The values do not change, only their order in memory: every path stays within float tolerance of
the training form (the layout tests run the equivalence checks on both), and `unfuse` returns the
usual row-major nn.Linear weights.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused import FusedInputProjections, FusedOutputProjection

LAYOUTS = ("standard", "transposed")
# "auto" keeps the standard layout unless the transposed one is at least this much faster: a
# smaller gain is within the noise of a shared machine and not worth a change.
MIN_GAIN = 0.05


def fused_gemms(model: nn.Module) -> list[nn.Module]:
    """The fused GEMM modules of `model` (each holds one `weight` buffer, out x in)."""
    return [m for m in model.modules() if isinstance(m, (FusedInputProjections, FusedOutputProjection))]


def laid_out(weight: Tensor, layout: str) -> Tensor:
    """`weight` (out x in) with the same values, stored row-major ("standard") or column-major ("transposed")."""
    if layout == "standard":
        return weight.contiguous()
    return weight.t().contiguous().t()


def layout_of(weight: Tensor) -> str:
    return "transposed" if weight.stride(0) == 1 and weight.shape[0] > 1 else "standard"


@torch.no_grad()
def time_gemm(weight: Tensor, layout: str, rows: int = 1, repeats: int = 5, calls: int = 20) -> float:
    """Best-of-`repeats` seconds per F.linear of a (rows x in) input with `weight` in `layout`."""
    w = laid_out(weight, layout)
    x = torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device)
    F.linear(x, w)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            F.linear(x, w)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def choose_layouts(model: nn.Module, rows: int = 1) -> dict[tuple[int, int], dict]:
    """For each distinct fused GEMM shape: both layouts timed at `rows` input rows, and the choice."""
    choices = {}
    for module in fused_gemms(model):
        shape = tuple(module.weight.shape)
        if shape in choices:
            continue
        times = {layout: time_gemm(module.weight, layout, rows) for layout in LAYOUTS}
        faster = times["transposed"] <= (1 - MIN_GAIN) * times["standard"]
        choices[shape] = {"seconds": times, "layout": "transposed" if faster else "standard"}
    return choices


@torch.no_grad()
def set_gemm_layout(model: nn.Module, layout: str = "auto", rows: int = 1) -> dict:
    """Store every fused GEMM weight of `model` in `layout` ("standard", "transposed", or "auto":
    measured per shape at `rows` input rows, i.e. the decode batch size). Returns what was chosen,
    with the timings when measured. The model must be fused (`fflora.fuse`)."""
    if layout not in (*LAYOUTS, "auto"):
        raise ValueError(f"gemm layout must be one of {[*LAYOUTS, 'auto']}, got {layout!r}")
    if not getattr(model, "ffba_fused", False):
        raise ValueError("the GEMM layout is a property of the fused form; call fflora.fuse(model) first")
    measured = choose_layouts(model, rows) if layout == "auto" else {}
    chosen = {}
    for module in fused_gemms(model):
        shape = tuple(module.weight.shape)
        target = measured[shape]["layout"] if measured else layout
        if layout_of(module.weight) != target:
            module.weight = laid_out(module.weight, target)
        chosen[f"{shape[0]}x{shape[1]}"] = target
    return {"layouts": chosen, "measured": {f"{r}x{c}": v["seconds"] for (r, c), v in measured.items()}}
