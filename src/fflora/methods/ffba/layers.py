"""Training (unfused) form: projection wrappers and the decoder layer that carries BA state.

The base projection runs as loaded; the adapter adds small GEMMs on its own parameters. This is
the form to train in. `fflora.methods.ffba.fused` replaces these modules for inference.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from ...utils.classes import subclass
from ..layers import WrappedProjection, refer_to
from .adapter import NEXT_SUB_BLOCK, LayerState, SubBlockAdapter


class AdaptedInputProjection(WrappedProjection):
    """One input projection (q/k/v, gate/up) of an adapted sub-block, training form.

    The first input projection of the sub-block (the "leader") also computes the FA bottleneck
    activation from the shared input u; every input projection adds its block of the incoming BA.
    """

    def __init__(self, base: nn.Linear, adapter: SubBlockAdapter, index: int) -> None:
        super().__init__()
        self.base = base
        refer_to(self, "adapter", adapter)
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        state = self.adapter.layer_state.current()
        adapter = self.adapter
        if adapter.disable_adapters:
            return y
        if self.index == 0 and adapter.fa_rank:
            state.fa[adapter.name] = adapter.fa_hidden(x)
        z = state.into.get(adapter.name)
        if z is not None and adapter.ba_in_rank:
            y = y + adapter.ba_delta(z, self.index, like=y)
        return y


class AdaptedOutputProjection(WrappedProjection):
    """The output projection (o_proj, down_proj) of an adapted sub-block, training form."""

    def __init__(self, base: nn.Linear, adapter: SubBlockAdapter) -> None:
        super().__init__()
        self.base = base
        refer_to(self, "adapter", adapter)

    def forward(self, c: Tensor) -> Tensor:
        y = self.base(c)
        state = self.adapter.layer_state.current()
        adapter = self.adapter
        if adapter.fa_rank and not adapter.disable_adapters:
            y = y + adapter.fa_delta(state.fa.pop(adapter.name), like=y)
        if adapter.ba_out_rank:  # carried even while switched off: the stream between layers keeps its width
            state.into[NEXT_SUB_BLOCK[adapter.name]] = adapter.ba_hidden(c)
        return y


class LayerAdapters(nn.Module):
    """The adapters of one decoder layer, registered on it as `layer.ffba`."""

    def __init__(self, attn: SubBlockAdapter | None, mlp: SubBlockAdapter | None, carried_width: int) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        # Width of the BA state this layer hands to the next one (0: none, e.g. the last layer).
        self.carried_width = carried_width
        self.state = LayerState()  # shared by reference with the adapters (and so the projections)
        for adapter in (attn, mlp):
            if adapter is not None:
                adapter.layer_state = self.state


class FFBADecoderLayerMixin:
    """Mixed into a decoder layer's class so that BA state crosses from layer l to layer l+1.

    Between layers the model's loop carries one tensor. While the MLP of layer l has a BA into
    the attention of layer l+1, that tensor is [h | z_b] (width d + r); `__call__` splits it and
    hands both parts to `forward` as positional arguments, so gradient checkpointing (reentrant
    or not, which wraps `forward`) records z_b as an input and recomputes the layer correctly.
    `forward` returns (h, z_b): module hooks, e.g. transformers' output_hidden_states recorder,
    see h at index 0; `__call__` then concatenates for the next layer. The last layer returns h.
    """

    def __call__(self, hidden_states: Tensor, *args, **kwargs):
        width = self.ffba_carried_in_width
        carried = None
        if width:
            hidden_states, carried = hidden_states[..., :-width], hidden_states[..., -width:]
        h, carried_out = super().__call__(hidden_states, carried, *args, **kwargs)
        if carried_out is None:
            return h
        return torch.cat([h, carried_out.to(h.dtype)], dim=-1)

    def forward(self, hidden_states: Tensor, carried: Tensor | None, *args, **kwargs):
        state = self.ffba.state
        state.open(carried)
        try:
            h = super().forward(hidden_states, *args, **kwargs)
            carried_out = state.into.get("next_layer") if self.ffba.carried_width else None
        finally:
            state.close()
        return h, carried_out


def ffba_layer_class(base_cls: type) -> type:
    """The FFBA subclass of a decoder layer class (transformers wraps its `forward` for checkpointing)."""
    return subclass(base_cls, FFBADecoderLayerMixin, "FFBA")
