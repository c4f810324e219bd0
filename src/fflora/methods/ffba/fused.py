"""FFBA's fused inference form: the adapter inside the two base GEMMs of every sub-block.

For a sub-block with input projections P_1..P_k (q|k|v or gate|up), output projection P_out and an
FFBA adapter, `fuse_ffba` builds (on `fflora.methods.fused`'s GEMMs)

    W_in  = [ W_1  s_b B_b1 ]        acting on [u; z_b_in]   -> [p_1; ...; p_k; z_f]
            [ ...  ...      ]
            [ W_k  s_b B_bk ]
            [ A_f  0        ]

    W_out = [ W_o  s_f B_f ]         acting on [c; phi(z_f)] -> [y; z_b_out]
            [ A_b  0       ]

Adapter parameters stay where they are and the adapter rows/columns are derived from them, so
replacing an adapter in a fused model rewrites only those rows/columns (`fused.refresh_adapters`).
"""

from __future__ import annotations

from torch import Tensor, nn

from ...models.architectures import sub_blocks
from ..fused import FusedInputProjections, FusedOutputProjection, install_fused, unfused_projections, unwrap, zero_padded
from .adapter import NEXT_SUB_BLOCK, PHI, LayerState, SubBlockAdapter
from .layers import AdaptedInputProjection, AdaptedOutputProjection
from .model import adapter_of


class FFBAInputProjections(FusedInputProjections):
    """A sub-block's input projections plus its FA down rows and BA up columns, as one GEMM."""

    def __init__(self, bases: list[nn.Linear], name: str, adapter: SubBlockAdapter) -> None:
        """`adapter.fa_rank` extra rows and `adapter.ba_in_rank` extra columns read and write the
        layer's FFBA state."""
        super().__init__(bases, name, extra_rows=adapter.fa_rank, extra_cols=adapter.ba_in_rank)
        self.fa_rank, self.ba_in_rank = adapter.fa_rank, adapter.ba_in_rank
        self.phi = PHI[adapter.phi_name]
        self.layer_state: LayerState = adapter.layer_state

    def refresh_adapter_weights(self, adapter: SubBlockAdapter) -> None:
        """Write the adapter's rows/columns in place; the base block is not touched."""
        if self.fa_rank:
            self.write_rows(self.base_rows, adapter.fa_down.detach())
        if self.ba_in_rank:
            self.write_cols(self.d_in, adapter.ba_scale * adapter.ba_up.detach())

    def _project(self, x: Tensor) -> list[Tensor]:
        if not (self.fa_rank or self.ba_in_rank):
            return super()._project(x)
        state = self.layer_state.current()
        inp = x
        if self.ba_in_rank:
            z = state.into.get(self.name)
            if z is None:  # no BA state arrived (cannot happen inside an FFBA layer)
                raise RuntimeError(f"fused {self.name} expected backward-adapter input, found none")
            inp = zero_padded([x, z.to(x.dtype)], self.n_cols)
        out = self.gemm(inp)
        parts = list(out.split(self.widths + [self.n_rows - self.base_rows], dim=-1))
        tail = parts.pop()  # FA rows, then zero padding
        if self.fa_rank:
            state.fa[self.name] = self.phi(tail[..., : self.fa_rank])
        return parts


class FFBAOutputProjection(FusedOutputProjection):
    """A sub-block's output projection plus its FA up columns and BA down rows, as one GEMM."""

    def __init__(self, base: nn.Linear, name: str, adapter: SubBlockAdapter) -> None:
        super().__init__(base, name, extra_rows=adapter.ba_out_rank, extra_cols=adapter.fa_rank)
        self.fa_rank, self.ba_out_rank = adapter.fa_rank, adapter.ba_out_rank
        self.layer_state: LayerState = adapter.layer_state

    def refresh_adapter_weights(self, adapter: SubBlockAdapter) -> None:
        """Write the adapter's rows/columns in place; the base block is not touched."""
        if self.fa_rank:
            self.write_cols(self.d_core, adapter.fa_scale * adapter.fa_up.detach())
        if self.ba_out_rank:
            self.write_rows(self.d_out, adapter.ba_down.detach())

    def forward(self, c: Tensor) -> Tensor:
        if not (self.fa_rank or self.ba_out_rank):  # e.g. the last MLP of an FFBA with FA off: nothing crosses
            return super().forward(c)
        state = self.layer_state.current()
        inp = zero_padded([c, state.fa.pop(self.name).to(c.dtype)], self.n_cols) if self.fa_rank else c
        out = self.gemm(inp)
        if self.ba_out_rank:
            state.into[NEXT_SUB_BLOCK[self.name]] = out[..., self.d_out : self.d_out + self.ba_out_rank]
        return out[..., : self.d_out] if self.n_rows != self.d_out else out


def fuse_ffba(model: nn.Module) -> None:
    """Switch a model carrying FFBA to the fused form, in place (sub-blocks without an adapter get the
    plain fused GEMMs)."""
    for _, layer, name, spec, holder in sub_blocks(model):
        adapter = adapter_of(layer, name)
        inputs, output = [unwrap(getattr(holder, p)) for p in spec.inputs], unwrap(getattr(holder, spec.output))
        if adapter is None:
            group, output = FusedInputProjections(inputs, name), FusedOutputProjection(output, name)
        else:
            group, output = FFBAInputProjections(inputs, name, adapter), FFBAOutputProjection(output, name, adapter)
            group.refresh_adapter_weights(adapter)
            output.refresh_adapter_weights(adapter)
        install_fused(holder, spec, group, output)


def unfuse_ffba(model: nn.Module) -> None:
    """Back to the training form: the original nn.Linear modules, rebuilt bit for bit, wrapped again."""
    for _, layer, name, spec, holder in sub_blocks(model):
        adapter = adapter_of(layer, name)
        inputs, output = unfused_projections(holder, spec)
        for index, (p, base) in enumerate(zip(spec.inputs, inputs)):
            setattr(holder, p, AdaptedInputProjection(base, adapter, index) if adapter is not None else base)
        setattr(holder, spec.output, AdaptedOutputProjection(output, adapter) if adapter is not None else output)
