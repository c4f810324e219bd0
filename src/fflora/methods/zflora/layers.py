"""zFLoRA's parameters and its training form (design: shared/design/zflora.md; our reading).

The residual stream of every decoder layer is `h~ = [h; z]`: h the base residual (width d), z the
adapter state (width w >= r; channels past r stay zero). It is widened once, at the input of the
first layer, and merged back once, at the final norm. A sub-block that carries zFLoRA

    u~ = [norm(h); z]                          # `ZNorm`: the base norm on h, z passed through
    p_j = W_j norm(h) + s * B_in_j z           # each input projection reads the state
    [y; dz] = [W_out c; A_out c]               # the output projection writes into it
    h~ = h~ + [y; dz]                          # the layer's own residual add, on d + w channels

and the head computes `norm_f(h + s * B_m z)`. A sub-block without zFLoRA (e.g. the MLPs of the
attention-only variant) reads norm(h) alone and adds zeros to z. Init: A_out Kaiming-uniform, B_in
and B_m zero, so a fresh adapter is the base model.

Here (training form) the base projections run as loaded and each adapter term is one small GEMM;
`fflora.methods.zflora.fused` folds B_in into the input GEMM's columns and A_out into the output GEMM's
rows. Both forms share the norms, the head merge and the decoder-layer class below.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...utils.classes import subclass
from ..layers import AdapterSwitch, WrappedProjection, adapter_linear, kaiming, refer_to, row_slices, zeros


class ZSubBlockAdapter(nn.Module, AdapterSwitch):
    """zFLoRA parameters of one sub-block: `z_in` = B_in (rows: the input projections' outputs, in
    `ArchitectureSpec` order; r columns) and `z_out` = A_out (r x width of the output projection's input).

    `reads=False` for the model's first sub-block with zFLoRA: the state it would read is still zero
    (nothing has written into it yet), so a B_in there would never change the output nor get a gradient;
    it has no `z_in` (None); its input projections skip the read (fused: their state columns stay zero,
    so every sub-block's GEMMs keep the same shape)."""

    def __init__(self, name: str, *, input_widths: tuple[int, ...], d_core: int, r: int, scale: float,
                 dropout: float, dtype, device, reads: bool = True) -> None:
        super().__init__()
        self.name = name
        self.input_widths = tuple(input_widths)
        self.input_slices = row_slices(self.input_widths)  # the rows of `z_in` for each input projection
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        self.z_in = zeros(sum(input_widths), r, dtype, device) if reads else None
        self.z_out = kaiming(r, d_core, dtype, device)

    @property
    def reads(self) -> bool:
        return self.z_in is not None

    @property
    def r(self) -> int:
        return self.z_out.shape[0]

    def read(self, z: Tensor, index: int, like: Tensor) -> Tensor:
        """s * B_in_j z for input projection `index` (z: the first r state channels)."""
        return (self.scale * adapter_linear(z, self.z_in[self.input_slices[index]])).to(like.dtype)

    def write(self, c: Tensor) -> Tensor:
        """A_out c: what the sub-block adds to the state."""
        return adapter_linear(self.dropout(c), self.z_out)


class ZLayerAdapters(nn.Module):
    """The zFLoRA adapters of one decoder layer, registered on it as `layer.zflora` (None: not adapted)."""

    def __init__(self, attn: ZSubBlockAdapter | None, mlp: ZSubBlockAdapter | None) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp


class ZNorm(nn.Module):
    """Stands where a sub-block's pre-norm stood: the base norm on the first d channels of the
    stream; the state z is passed on after them (`keep_state`) or dropped (a sub-block that does not read it)."""

    def __init__(self, norm: nn.Module, d: int, keep_state: bool) -> None:
        super().__init__()
        self.norm = norm
        self.d = d
        self.keep_state = keep_state

    def forward(self, x: Tensor) -> Tensor:
        u = self.norm(x[..., : self.d])
        if not self.keep_state:
            return u
        return torch.cat([u, x[..., self.d :].to(u.dtype)], dim=-1)

    def extra_repr(self) -> str:
        return f"d={self.d}, keep_state={self.keep_state}"


class ZMergedHead(nn.Module):
    """Stands where the final norm stood: norm_f(h + s * B_m z), the one merge back to width d, with B_m
    (`z_merge`, d x r) fixed: what a merged and unloaded model keeps (no PEFT switch)."""

    def __init__(self, norm: nn.Module, d: int, scale: float, z_merge: Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.d = d
        self.scale = scale
        if isinstance(z_merge, nn.Parameter):
            self.z_merge = z_merge
        else:
            self.register_buffer("z_merge", z_merge)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(h, z) of the widened stream."""
        if x.shape[-1] == self.d:
            raise RuntimeError("the zFLoRA head merge got a stream without adapter state; call the whole model")
        return x[..., : self.d], x[..., self.d : self.d + self.z_merge.shape[1]]

    def forward(self, x: Tensor) -> Tensor:
        h, z = self.split(x)
        return self.norm(h + (self.scale * adapter_linear(z, self.z_merge)).to(h.dtype))


class ZHeadMerge(ZMergedHead, AdapterSwitch):
    """The head merge in training form: B_m a parameter, zero at init, and PEFT's on/off switch."""

    def __init__(self, norm: nn.Module, d: int, r: int, scale: float, dtype, device) -> None:
        super().__init__(norm, d, scale, zeros(d, r, dtype, device))

    def forward(self, x: Tensor) -> Tensor:
        if self.disable_adapters:
            return self.norm(self.split(x)[0])
        return super().forward(x)


class ZInputProjection(WrappedProjection):
    """An input projection (q/k/v, gate/up) of a sub-block with zFLoRA, training form: the base
    projection on the first d channels plus the adapter's read of the state."""

    def __init__(self, base: nn.Linear, adapter: ZSubBlockAdapter, index: int) -> None:
        super().__init__()
        self.base = base
        refer_to(self, "adapter", adapter)
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        d = self.base.in_features
        y = self.base(x[..., :d])
        if self.adapter.disable_adapters or not self.adapter.reads:
            return y
        return y + self.adapter.read(x[..., d : d + self.adapter.r], self.index, like=y)


class ZOutputProjection(WrappedProjection):
    """The output projection (o_proj, down_proj) of every sub-block of a zFLoRA model, training form:
    [W_out c; A_out c], or [W_out c; 0] for a sub-block without zFLoRA (the stream is d + r wide)."""

    def __init__(self, base: nn.Linear, adapter: ZSubBlockAdapter | None, state_width: int) -> None:
        super().__init__()
        self.base = base
        refer_to(self, "adapter", adapter)
        self.state_width = state_width

    def forward(self, c: Tensor) -> Tensor:
        y = self.base(c)
        if self.adapter is None:
            return F.pad(y, (0, self.state_width))
        return torch.cat([y, self.adapter.write(c).to(y.dtype)], dim=-1)


class ZFLoRADecoderLayerMixin:
    """Mixed into a decoder layer's class: the layer maps the (d + w)-wide stream to itself.

    The first layer receives the embeddings (width d) and widens them with w zero channels, inside
    `forward`, so that gradient checkpointing (which wraps `forward`) records the original input.
    `forward` returns (h, h~): transformers' hidden-state recorder reads index 0 and sees width d,
    the stream itself (index 1) goes on to the next layer.
    """

    zflora_d: int
    zflora_state_width: int

    def __call__(self, hidden_states: Tensor, *args, **kwargs):
        return super().__call__(hidden_states, *args, **kwargs)[1]

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if hidden_states.shape[-1] == self.zflora_d:
            hidden_states = F.pad(hidden_states, (0, self.zflora_state_width))
        stream = super().forward(hidden_states, *args, **kwargs)
        return stream[..., : self.zflora_d], stream


def zflora_layer_class(base_cls: type) -> type:
    """The zFLoRA subclass of a decoder layer class."""
    return subclass(base_cls, ZFLoRADecoderLayerMixin, "ZFLoRA")
