"""The formats a fused model's weights can take: `fflora.fuse(model, weights=...)`.

    "float32", "bfloat16"  dense, the whole model in that dtype
    "int8"                 every fused GEMM's base rows, the LM head and the embedding table weight-only
                           int8, one scale per output row (`fflora.ops.int8`); one copy where the head
                           and the embedding are tied; activations (norms, attention, the rest) in bfloat16
    "int4"                 every fused GEMM's base rows weight-only int4 in groups of 32 along its input,
                           each group with its own scale and offset (`fflora.ops.int4`); the LM head and
                           the embedding table int8 as above; needs input widths that are multiples of 32

In both, an adapter's rows and columns stay float32 beside the quantized base rows (`fflora.ops.storage`):
loading or swapping an adapter rewrites only them, and the adapter is not rounded at all.

Adapter parameters (training form) keep their dtype: unfusing gives them back exactly. The base weights
are rounded to the format: unfusing a model fused in bfloat16, int8 or int4 gives the rounded (dequantized)
weights in the model's original dtype, not the original ones. Rotary frequencies stay in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.int8 import dequantize_rows, int8_linear, quantize_rows
from .fingerprint import base_model_fingerprint

DENSE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def format_of(dtype: torch.dtype) -> str:
    return {v: k for k, v in DENSE.items()}.get(dtype, str(dtype).removeprefix("torch."))


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with a scale each; looks up in bfloat16."""

    def __init__(self, values: Tensor, scale: Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.register_buffer("values", values)
        self.register_buffer("scale", scale)
        self.padding_idx = padding_idx

    @property
    def weight(self) -> Tensor:  # what transformers and the fingerprint read: the dequantized table
        return dequantize_rows(self.values, self.scale, self.scale.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return self.values[ids].to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)


class Int8Head(nn.Module):
    """The LM head as a weight-only int8 GEMM (sharing the embedding's int8 rows where they are tied)."""

    def __init__(self, values: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("values", values)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        out = int8_linear(x, self.values, self.scale)
        return out if self.bias is None else out + self.bias


def convert(model: nn.Module, state, weights: str | None, keep: set[int]) -> None:
    """Put a just-fused model's weights in format `weights` (None: as they are) and record it, its dtype
    and the fingerprint from before quantizing in `state` (the model's `FusedModel`); `keep`: ids of
    tensors that keep their dtype (the adapter's parameters)."""
    state.dtype = model.get_input_embeddings().weight.dtype
    state.weights = format_of(state.dtype)
    if weights is None or weights == state.weights:
        return
    if weights in ("int8", "int4"):
        narrow = sorted({g.d_main for g in state.gemms if g.d_main % 32}) if weights == "int4" else []
        if narrow:
            raise ValueError(f"int4 weights group 32 input columns; this model's GEMMs take {narrow}: use int8")
        state.fingerprint = base_model_fingerprint(model)  # of the weights as they were
        for gemm in state.gemms:
            gemm.to_format(weights)
        _quantize_embeddings(model)
    _cast(model, DENSE.get(weights, torch.bfloat16), keep)
    state.weights = weights


def restore(model: nn.Module, state, keep: set[int]) -> None:
    """Undo `convert` (`state`: the model's `FusedModel`) before unfusing: the embeddings dense again, everything in the original dtype."""
    if state.weights == format_of(state.dtype):
        return
    if state.weights in ("int8", "int4"):
        _dequantize_embeddings(model)
    _cast(model, state.dtype, keep)


def _cast(model: nn.Module, dtype: torch.dtype, keep: set[int]) -> None:
    """Every floating parameter and buffer to `dtype`, but those in `keep` and rotary frequencies."""
    for module in model.modules():
        own = getattr(module, "keeps_dtype", ())  # e.g. a quantized GEMM's float32 column block
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if (tensor is None or id(tensor) in keep or not tensor.is_floating_point() or "inv_freq" in name
                        or name in own):
                    continue
                if isinstance(tensor, nn.Parameter):
                    tensor.data = tensor.data.to(dtype)
                else:
                    table[name] = tensor.to(dtype)
    model.config.dtype = dtype


def _quantize_embeddings(model: nn.Module) -> None:
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    values, scale = quantize_rows(embedding.weight)
    model.set_input_embeddings(Int8Embedding(values, scale, embedding.padding_idx))
    if head is None:
        return
    tied = head.weight is embedding.weight
    if not tied:
        values, scale = quantize_rows(head.weight)
    bias = None if head.bias is None else head.bias.detach().to(torch.bfloat16)
    model.set_output_embeddings(Int8Head(values, scale, bias))


def _dequantize_embeddings(model: nn.Module) -> None:
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    table = nn.Embedding(*embedding.values.shape, padding_idx=embedding.padding_idx, device="meta")
    table.weight = nn.Parameter(embedding.weight.clone(), requires_grad=False)
    model.set_input_embeddings(table)
    if isinstance(head, Int8Head):
        linear = nn.Linear(head.values.shape[1], head.values.shape[0], bias=head.bias is not None, device="meta")
        tied = head.values is embedding.values
        linear.weight = table.weight if tied else nn.Parameter(dequantize_rows(head.values, head.scale), requires_grad=False)
        if head.bias is not None:
            linear.bias = nn.Parameter(head.bias.clone(), requires_grad=False)
        model.set_output_embeddings(linear)
