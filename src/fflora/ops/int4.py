"""Weight-only int4 with groups of 32 along the input: each group of 32 weights of a row has its own
scale and offset (asymmetric, `w ~= (q - 8) * scale + zero`), run by PyTorch's CPU kernel
`aten._weight_int4pack_mm_for_cpu` on bfloat16 activations.

The kernel's packed layout needs a multiple of 16 rows (`round_rows`).
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUP = 32
ROWS_MULTIPLE = 16  # the packer's requirement


def quantize_groups(weight: Tensor, group: int = GROUP) -> tuple[Tensor, Tensor]:
    """(q in 0..15 as uint8, rows x cols; scales and zeros, (cols / group) x rows x 2 in bfloat16)."""
    w = weight.detach().float()
    rows, cols = w.shape
    grouped = w.view(rows, cols // group, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((grouped - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(rows, cols)
    zero = low + 8 * scale
    return q, torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()


def pack(q: Tensor) -> Tensor:
    """The kernel's packed form of q (rows a multiple of 16)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def int4_linear(x: Tensor, packed: Tensor, scales_zeros: Tensor, group: int = GROUP) -> Tensor:
    """x @ W.T in bfloat16 for x of any leading shape (W: the packed rows)."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, group, scales_zeros.to(torch.bfloat16))
    return out.view(*x.shape[:-1], packed.shape[0])


def dequantize(packed: Tensor, scales_zeros: Tensor, cols: int, group: int = GROUP) -> Tensor:
    """The weights the kernel computes with (bfloat16, rows x cols), read back through the kernel."""
    return int4_linear(torch.eye(cols, dtype=torch.bfloat16), packed, scales_zeros, group).t().contiguous()


def round_rows(n: int) -> int:
    return -(-n // ROWS_MULTIPLE) * ROWS_MULTIPLE
