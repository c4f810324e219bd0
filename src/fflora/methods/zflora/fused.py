"""zFLoRA's fused inference form: every sub-block runs only the base model's GEMMs, wider.

    input GEMM   [W_1 | s B_in_1; ...; W_k | s B_in_k]   acting on u~ = [norm(h); z]  -> p_1..p_k
    output GEMM  [W_out; A_out]                         acting on c                 -> [y; dz]

The norm already hands over the (d + w)-wide u~ and the layer's residual add takes [y; dz] as it
is, so there is no concat of GEMM inputs and no split of GEMM outputs besides the q|k|v views the
fused base has anyway. The state width w is r rounded up so that d + w is a multiple of
`fflora.methods.fused.ALIGN` (odd GEMM sizes are slow on CPU); the extra channels stay zero.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...models.architectures import sub_blocks
from ..fused import ALIGN, FusedInputProjections, FusedOutputProjection, install_fused, unfused_projections, unwrap
from .layers import ZInputProjection, ZOutputProjection, ZSubBlockAdapter
from .model import zflora_rank


def fused_state_width(d: int, r: int) -> int:
    """w >= r such that d + w is a multiple of ALIGN."""
    return -(-(d + r) // ALIGN) * ALIGN - d


class ZFusedInputProjections(FusedInputProjections):
    """The input projections of a sub-block with zFLoRA as one GEMM over the widened norm output."""

    def __init__(self, bases: list[nn.Linear], name: str, state_width: int) -> None:
        super().__init__(bases, name, extra_cols=state_width)  # state_width extra columns, zero until written

    def refresh_adapter_weights(self, adapter: ZSubBlockAdapter) -> None:
        """Write s * B_in into the state columns (they stay zero for a sub-block that does not read the state)."""
        if adapter.reads:
            self.write_cols(self.d_in, adapter.scale * adapter.z_in.detach())


class ZFusedOutputProjection(FusedOutputProjection):
    """The output projection with A_out as extra rows: it returns [y; dz], the stream's full width."""

    def __init__(self, base: nn.Linear, name: str, state_width: int) -> None:
        super().__init__(base, name, extra_rows=state_width)  # state_width extra rows, zero until written

    def refresh_adapter_weights(self, adapter: ZSubBlockAdapter) -> None:
        self.write_rows(self.d_out, adapter.z_out.detach())

    def forward(self, c: Tensor) -> Tensor:
        return self.gemm(c)


def adapter_of(layer: nn.Module, name: str) -> ZSubBlockAdapter | None:
    """The zFLoRA adapter of sub-block `name` of a decoder layer (None: not adapted)."""
    return getattr(layer.zflora, name)


def fuse_zflora(model: nn.Module) -> None:
    """Switch a model carrying zFLoRA to the fused form, in place."""
    width = fused_state_width(model.config.hidden_size, zflora_rank(model))
    for _, layer, name, spec, holder in sub_blocks(model):
        adapter = adapter_of(layer, name)
        inputs = [unwrap(getattr(holder, p)) for p in spec.inputs]
        output = ZFusedOutputProjection(unwrap(getattr(holder, spec.output)), name, width)
        if adapter is None:
            group = FusedInputProjections(inputs, name)
        else:
            group = ZFusedInputProjections(inputs, name, width)
            group.refresh_adapter_weights(adapter)
            output.refresh_adapter_weights(adapter)
        install_fused(holder, spec, group, output)
        layer.zflora_state_width = width


def unfuse_zflora(model: nn.Module) -> None:
    """Back to the training form: the original nn.Linear modules, rebuilt bit for bit."""
    r = zflora_rank(model)
    for _, layer, name, spec, holder in sub_blocks(model):
        adapter = adapter_of(layer, name)
        inputs, output = unfused_projections(holder, spec)
        for index, (p, base) in enumerate(zip(spec.inputs, inputs)):
            setattr(holder, p, ZInputProjection(base, adapter, index) if adapter is not None else base)
        setattr(holder, spec.output, ZOutputProjection(output, adapter, r))
        layer.zflora_state_width = r
