"""The decode fast path of a fused model: each GEMM's weight layout and operand order, by measurement.

A fused model owns every base projection GEMM (and here also takes the LM head), so it can choose
how each one runs (`fflora.ops.gemm`: row- or column-major weight, `x W^T` or `(W x^T)^T`, or a
oneDNN-packed copy run by oneDNN's linear). On an AVX-512 EPYC with 2 threads, SmolLM2-135M's decode
GEMMs, streamed from memory as in a real step:

    rows 1: the column-major layout is 1.3x (q|k|v), 1.7x (gate|up) and 1.9x (LM head) faster,
            and 1.25x slower for down_proj
    rows 8: (W x^T)^T on row-major weights is 1.2-2.2x faster except for down_proj

so no single BLAS layout wins, and another CPU (an AVX2 EPYC measured the column-major layout faster
for every GEMV shape) answers differently; oneDNN's packed linear beat both there at 8 rows (32 GB/s
against 15 in float32), at the cost of a second copy of each weight it takes. `plan_gemms(model,
"auto", rows=(1, 8))` therefore times every (layout, order) for each distinct weight shape at the
given decode row counts, stores each weight in the layout with the least total time over those row
counts and runs each row count in its faster order. The measurement streams a 256 MiB working set, as
a decode step does, and takes 12 s for SmolLM2 here (`report["seconds"]`; minutes where another
process holds the cores: OpenMP waits on them): a warm-up cost paid once, at fuse time or when asked.

Values never change, only their order in memory and the kernel that reads them: every plan stays
within float tolerance of the training form (tests run the equivalence checks under each mode),
and `fflora.unfuse` returns row-major nn.Linear weights and a plain LM head (`FusedModel.unfuse`).

This module knows nothing of adapters or of fused models: `FusedModel.plan` hands it the modules to
plan (`planned_modules`) and keeps the result.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..ops.formats import LAYOUTS, MODES, ORDERS
from ..ops.gemm import GemmPlan, PlannedLinear, onednn_linear, packable, packed, planned_linear, set_gemm_plan

WORKING_SET_BYTES = 256 * 2**20  # larger than the caches: weights come from memory, as in a decode step
MAX_COPIES = 256  # of one small weight in that working set (bounds the number of timed calls)


def planned_modules(model: nn.Module, storages: list[nn.Module]) -> list[nn.Module]:
    """The modules whose GEMMs a plan covers: the dense ones of `model`'s fused GEMM storages
    (`fflora.ops.storage`) and a plain nn.Linear LM head."""
    modules = [m for m in storages if not m.quantized]  # int8 and int4 GEMMs have one kernel: nothing to choose
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) in (nn.Linear, PlannedLinear):
        modules.append(head)
    return modules


_MEASURED: dict[tuple, float] = {}  # (shape, dtype, threads, layout, order, rows) -> seconds, for this process


def candidates(dtype: torch.dtype) -> list[tuple[str, str]]:
    """The (layout, order) pairs a plan chooses from: either BLAS order on either plain layout, and oneDNN's
    packed linear (one kernel: order "xw") where it runs `dtype`."""
    pairs = [(layout, order) for layout in LAYOUTS if layout != "packed" for order in ORDERS]
    return pairs + [("packed", "xw")] if packable(dtype) else pairs


@torch.no_grad()
def measure_shape(shape: tuple[int, int], dtype: torch.dtype, rows: tuple[int, ...], repeats: int = 5) -> dict:
    """Seconds per GEMM of an (out x in) weight for every candidate layout and order and row count (keys
    "layout/order/rows"), streaming distinct weights through a working set larger than the caches.
    The candidates take turns within each repeat, so that drift on a shared machine hits them
    alike, and each keeps its best repeat. Measured once per process and thread count."""
    out_features, in_features = shape
    numel = out_features * in_features
    element = torch.empty((), dtype=dtype).element_size()
    copies = min(MAX_COPIES, max(2, WORKING_SET_BYTES // (numel * element)))
    prefix = (shape, dtype, torch.get_num_threads())
    pairs = candidates(dtype)
    todo = [(layout, order, m) for m in rows for layout, order in pairs if (*prefix, layout, order, m) not in _MEASURED]
    if todo:
        buffer = torch.empty(copies * numel, dtype=dtype).uniform_(-0.05, 0.05)
        standard = [buffer[k * numel : (k + 1) * numel].view(shape) for k in range(copies)]
        weights = {"standard": standard,
                   "transposed": [buffer[k * numel : (k + 1) * numel].view(in_features, out_features).t()
                                  for k in range(copies)]}
        if any(layout == "packed" for layout, _, _ in todo):
            weights["packed"] = [packed(w, max(rows)) for w in standard]
        inputs = {m: torch.randn(m, in_features, dtype=dtype) for m in rows}
        best = dict.fromkeys(todo, float("inf"))
        for repeat in range(repeats + 1):  # the first round warms up
            for layout, order, m in todo:
                plan = GemmPlan(layout, ((m, order),))
                start = time.perf_counter()
                for w in weights[layout]:
                    if layout == "packed":
                        onednn_linear(inputs[m], w)
                    else:
                        planned_linear(inputs[m], w, None, plan)
                if repeat:
                    best[layout, order, m] = min(best[layout, order, m], (time.perf_counter() - start) / copies)
        _MEASURED.update({(*prefix, *key): value for key, value in best.items()})
    return {f"{layout}/{order}/{m}": _MEASURED[(*prefix, layout, order, m)] for m in rows for layout, order in pairs}


def choose_plan(times: dict, rows: tuple[int, ...]) -> GemmPlan:
    """The layout with the least total time over `rows` (each in its faster order), and those orders
    (the packed layout where it was measured)."""
    def best(layout: str, m: int) -> tuple[float, str]:
        return min((times[key], order) for order in ORDERS if (key := f"{layout}/{order}/{m}") in times)

    layouts = [lay for lay in LAYOUTS if f"{lay}/xw/{rows[0]}" in times]
    layout = min(layouts, key=lambda lay: (sum(best(lay, m)[0] for m in rows), lay != "standard"))
    return GemmPlan(layout, tuple((m, best(layout, m)[1]) for m in sorted(rows)))


@torch.no_grad()
def plan_modules(modules: list[nn.Module], mode: str = "auto", rows: tuple[int, ...] = (1, 8)) -> dict:
    """Set how each of `modules` (`planned_modules`) runs; returns a report (see the module docstring).

    mode "standard": row-major weights, F.linear (what `fflora.fuse` gives); "transposed":
    column-major weights, F.linear; "packed": oneDNN's packed copies (`fflora.ops.gemm`); "auto":
    measured per weight shape at `rows` input rows (the decode batch sizes to serve).
    """
    if mode not in MODES:
        raise ValueError(f"gemm plan must be one of {list(MODES)}, got {mode!r}")
    if not rows or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in rows):
        raise ValueError(f"rows must be integers >= 1 (the decode batch sizes to tune for), got {list(rows)}")
    start = time.perf_counter()
    measured, plans = {}, {}
    for module in modules:
        key = (tuple(module.weight.shape), module.weight.dtype)
        if key in plans:
            continue
        if mode == "packed" and not packable(key[1], module.weight.device):
            raise ValueError(f"the packed layout runs float32 and bfloat16 weights on a CPU where PyTorch has oneDNN; "
                             f"these are {key[1]} on {module.weight.device}: plan 'auto' or 'standard'")
        if mode == "auto":
            measured[key] = measure_shape(key[0], key[1], tuple(rows))  # on the CPU
            if not packable(key[1], module.weight.device):
                measured[key] = {k: t for k, t in measured[key].items() if not k.startswith("packed/")}
            plans[key] = choose_plan(measured[key], tuple(rows))
        else:
            plans[key] = GemmPlan(mode, tuple((m, "xw") for m in sorted(rows)) if mode == "packed" else ())
    for module in modules:
        set_gemm_plan(module, None if mode == "standard" else plans[(tuple(module.weight.shape), module.weight.dtype)])
    copies = [m.weight for m in modules if getattr(m, "packed_handle", None) is not None]
    return {
        "mode": mode, "rows": list(rows), "seconds": time.perf_counter() - start,
        "packed_bytes": sum(w.numel() * w.element_size() for w in copies),  # the packed layout's second copies
        "plans": {_name(key): {"layout": p.layout, "orders": dict(p.orders)} for key, p in plans.items()},
        "measured": {_name(key): t for key, t in measured.items()},
    }


def _name(key) -> str:
    (out_features, in_features), dtype = key
    return f"{out_features}x{in_features} {str(dtype).removeprefix('torch.')}"
