"""The adapter math of one sub-block, and the activations that flow between projections.

Our reading of FFBA (the paper's equations are not public; see "The method" in the README). A
sub-block is `u -> P_in(u) -> core -> P_out(c)`. Its adapter has up to three parts:

* forward adapter (FA):  y += s_f * B_f phi(A_f u)                 fa_down = A_f, fa_up = B_f
* backward adapter out:  z_b = A_b c  (handed to the next sub-block) ba_down = A_b
* backward adapter in:   p_j += s_b * B_bj z_b for each input proj j ba_up = [B_b1; B_b2; ...]

`ba_up` of a sub-block consumes the `ba_down` output of the sub-block before it (attn -> mlp of
the same layer, mlp of layer l -> attn of layer l+1). Down-projections start Kaiming-uniform and
up-projections zero, as in LoRA, so a fresh adapter leaves the model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import AdapterSwitch, adapter_linear, kaiming, row_slices, zeros

PHI = {"identity": lambda x: x, "relu": F.relu, "silu": F.silu}

# Where the backward adapter of each sub-block sends its down-projection.
NEXT_SUB_BLOCK = {"attn": "mlp", "mlp": "next_layer"}


@dataclass
class LayerState:
    """Adapter activations in flight during one decoder-layer call.

    `into[name]` is a BA down-projection waiting for the input projections of sub-block `name`
    ("next_layer" leaves the layer). `fa[name]` is phi(A_f u) of sub-block `name`, waiting for its
    output projection. Each FFBA decoder layer owns one (`layer.ffba.state`) and its projections
    hold a plain reference to it; the layer opens it at the start of every call and closes it at
    the end, so recomputation under gradient checkpointing rebuilds it from the layer's own
    inputs. A plain object rather than a context variable, so that `torch.compile` traces a fused
    decode step without graph breaks.
    """

    into: dict[str, Tensor] = field(default_factory=dict)
    fa: dict[str, Tensor] = field(default_factory=dict)
    active: bool = False

    def open(self, carried_in: Tensor | None) -> None:
        """Start a layer call: nothing in flight but the BA state carried in from the layer before."""
        self.into.clear()
        self.fa.clear()
        if carried_in is not None:
            self.into["attn"] = carried_in
        self.active = True

    def close(self) -> None:
        """End a layer call, dropping the references to its activations."""
        self.into.clear()
        self.fa.clear()
        self.active = False

    def current(self) -> LayerState:
        """This state, checked to be inside its layer's call."""
        if not self.active:
            raise RuntimeError(
                "an FFBA projection was called outside its decoder layer; call the model (or the "
                "decoder layer) rather than a projection module on its own"
            )
        return self


class SubBlockAdapter(nn.Module, AdapterSwitch):
    """Adapter parameters of one sub-block (attention or MLP) of one decoder layer.

    name:          "attn" or "mlp"
    d_in:          width of the sub-block input u (and of what the output projection writes)
    d_core:        width of the output projection's input c
    input_widths:  out_features of each input projection, in `ArchitectureSpec` order
    fa_rank:       rank of the forward adapter across this sub-block (0: none)
    ba_out_rank:   rank of the backward adapter leaving this sub-block (0: none)
    ba_in_rank:    rank of the backward adapter arriving at this sub-block's inputs (0: none)
    """

    def __init__(
        self,
        name: str,
        *,
        d_in: int,
        d_core: int,
        input_widths: tuple[int, ...],
        fa_rank: int,
        fa_scale: float,
        ba_out_rank: int,
        ba_in_rank: int,
        ba_scale: float,
        phi: str,
        dropout: float,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.name = name
        self.input_widths = tuple(input_widths)
        self.input_slices = row_slices(self.input_widths)  # the rows of `ba_up` for each input projection
        self.fa_scale = fa_scale
        self.ba_scale = ba_scale
        self.phi_name = phi
        self.dropout = nn.Dropout(dropout)
        self.fa_down = kaiming(fa_rank, d_in, dtype, device) if fa_rank else None
        self.fa_up = zeros(d_in, fa_rank, dtype, device) if fa_rank else None
        self.ba_down = kaiming(ba_out_rank, d_core, dtype, device) if ba_out_rank else None
        self.ba_up = zeros(sum(input_widths), ba_in_rank, dtype, device) if ba_in_rank else None

    @property
    def fa_rank(self) -> int:
        return 0 if self.fa_down is None else self.fa_down.shape[0]

    @property
    def ba_out_rank(self) -> int:
        return 0 if self.ba_down is None else self.ba_down.shape[0]

    @property
    def ba_in_rank(self) -> int:
        return 0 if self.ba_up is None else self.ba_up.shape[1]

    def phi(self, x: Tensor) -> Tensor:
        return PHI[self.phi_name](x)

    # --- training form: each call is one small GEMM on the adapter's own parameters ---

    def fa_hidden(self, u: Tensor) -> Tensor:
        """phi(A_f u): the FA bottleneck activation, read from the sub-block input."""
        return self.phi(adapter_linear(self.dropout(u), self.fa_down))

    def fa_delta(self, hidden: Tensor, like: Tensor) -> Tensor:
        """s_f * B_f hidden, in the dtype of the output projection's result `like`."""
        return (self.fa_scale * adapter_linear(hidden, self.fa_up)).to(like.dtype)

    def ba_hidden(self, c: Tensor) -> Tensor:
        """A_b c: the BA down-projection of the output projection's input."""
        return adapter_linear(self.dropout(c), self.ba_down)

    def ba_delta(self, z: Tensor, index: int, like: Tensor) -> Tensor:
        """s_b * B_bj z for input projection `index`."""
        block = self.ba_up[self.input_slices[index]]
        return (self.ba_scale * adapter_linear(z, block)).to(like.dtype)

