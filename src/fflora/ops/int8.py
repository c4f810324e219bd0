"""Weight-only int8: each output row quantized on its own (symmetric, one scale per row), run by
PyTorch's CPU kernel `aten._weight_int8pack_mm` on bfloat16 activations (its AVX-512 path; with
float32 activations it falls back to a scalar loop, 25-50x slower, so activations are cast)."""

from __future__ import annotations

import torch
from torch import Tensor


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 values, bfloat16 scale per row) with weight ~= values * scale[:, None]; an all-zero row
    gets scale 1 (its values stay 0)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.bfloat16)
    values = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return values, scale


def dequantize_rows(values: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (values.float() * scale.float()[:, None]).to(dtype)


def int8_linear(x: Tensor, values: Tensor, scale: Tensor) -> Tensor:
    """x @ (values * scale[:, None]).T in bfloat16, for x of any leading shape."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    return torch.ops.aten._weight_int8pack_mm(flat, values, scale).view(*x.shape[:-1], values.shape[0])
