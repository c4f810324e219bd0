"""The names of what fflora's kernels take: weight formats, GEMM layouts and operand orders.

Plain names, without PyTorch, so that settings and the command line can check them before anything
heavy loads (`fflora --help` imports no torch). The kernels themselves: `int8`, `int4`, `gemm`.
"""

from __future__ import annotations

WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "int4")  # `fflora.methods.weight_formats`
# A weight stored row-major (as nn.Linear keeps it) or column-major, or row-major with a copy in oneDNN's
# blocked layout beside it, run by oneDNN's linear (what inductor's freezing gives CPU linears; `ops.gemm`)
LAYOUTS = ("standard", "transposed", "packed")
ORDERS = ("xw", "wx")  # F.linear(x, W), or (W x^T)^T
MODES = (*LAYOUTS, "auto")  # a GEMM plan: one layout for every GEMM, or measured per shape (`fastpath.plan`)


def check_weights(weights: str | None) -> None:
    """ValueError unless `weights` names a format (None: keep the model's dtype) this CPU runs."""
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; fflora has {list(WEIGHT_FORMATS)}")
    if weights in ("int8", "int4"):
        import torch  # here, not above: the names load without PyTorch

        capability = torch.backends.cpu.get_cpu_capability()
        if capability != "AVX512":
            raise ValueError(f"{weights} weights run PyTorch's AVX-512 kernel (bfloat16 activations); this CPU has "
                             f"{capability}, where it falls back to scalar code: use weights='float32' or 'bfloat16'")
