"""The fused inference form every method builds on: one GEMM for a sub-block's input projections, one
for its output projection, each with room for a method's adapter rows and columns.

A sub-block with input projections P_1..P_k (q|k|v or gate|up) and output projection P_out becomes

    input GEMM   [W_1; ...; W_k] widened by `extra_rows` rows (adapter activations it produces) and
                 `extra_cols` columns (adapter activations it consumes, appended to its input)
    output GEMM  W_out, widened the same way

(FFBA's layout: `ffba.fused`; zFLoRA's: `zflora.fused`; the bank's: `ffba.bank`). The fused matrices
are the only copy of the base weights while fused (no duplicate memory); `unfused()` rebuilds the
original nn.Linear modules from them bit for bit. The extra rows and columns are zero until a method
writes its adapter into them, so replacing an adapter rewrites only those.

The model's own attention/MLP code is kept: it calls q_proj, k_proj and v_proj in turn on the same
input, so the first of them runs the fused GEMM and its siblings return views of the result.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.architectures import sub_blocks
from ..ops.gemm import GemmPlan, planned_linear
from .layers import WrappedProjection, refer_to

# Every fused GEMM dimension an adapter widens is padded with zeros to a multiple of ALIGN. CPU GEMM
# kernels slow down sharply on odd sizes: on SmolLM2 at batch 8 x 128, prefill took 1.82 s with r=8,
# 2.26 s with r=10 and 1.90 s with r=16 before this padding.
ALIGN = 8


def aligned(n: int, extra: int) -> int:
    """n rounded up to a multiple of ALIGN when an adapter widened it (extra > 0), else n."""
    return -(-n // ALIGN) * ALIGN if extra else n


def zero_padded(parts: list[Tensor], width: int) -> Tensor:
    """cat(parts) along the last dimension, with zeros up to `width`."""
    pad = width - sum(p.shape[-1] for p in parts)
    if pad:
        parts = [*parts, parts[0].new_zeros(*parts[0].shape[:-1], pad)]
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


class FusedInputProjections(nn.Module):
    """All input projections of one sub-block as one GEMM, with `extra_rows` rows and `extra_cols`
    columns reserved for an adapter (zeros until written). Here the GEMM's input must already be
    `n_cols` wide and the extra rows' output is dropped; a method's subclass overrides `_project`
    to feed and read them."""

    gemm_plan: GemmPlan | None = None  # how the GEMM runs (fflora.fastpath); None: F.linear

    def __init__(self, bases: list[nn.Linear], name: str, extra_rows: int = 0, extra_cols: int = 0) -> None:
        super().__init__()
        self.name = name
        self.widths = [b.out_features for b in bases]
        self.d_in = bases[0].in_features
        self.extra_rows, self.extra_cols = extra_rows, extra_cols
        ref = bases[0].weight
        self.base_rows = rows = sum(self.widths)
        self.n_rows = aligned(rows + extra_rows, extra_rows)
        self.n_cols = aligned(self.d_in + extra_cols, extra_cols)
        weight = torch.zeros(self.n_rows, self.n_cols, dtype=ref.dtype, device=ref.device)
        weight[:rows, : self.d_in] = torch.cat([b.weight.detach() for b in bases], dim=0)
        self.register_buffer("weight", weight)
        self.has_bias = [b.bias is not None for b in bases]
        if any(self.has_bias):
            bias = torch.zeros(self.n_rows, dtype=ref.dtype, device=ref.device)
            start = 0
            for b, width in zip(bases, self.widths):
                if b.bias is not None:
                    bias[start : start + width] = b.bias.detach()
                start += width
            self.register_buffer("bias", bias)
        else:
            self.bias = None
        self._cache: tuple[Tensor, list[Tensor]] | None = None
        self._served = 0

    def output(self, x: Tensor, index: int) -> Tensor:
        """Input projection `index` of x; the first call for a new x runs the fused GEMM."""
        if self._cache is None or self._cache[0] is not x:
            self._cache = (x, self._project(x))
            self._served = 0
        parts = self._cache[1]
        self._served += 1
        if self._served == len(self.widths):  # every sibling has its view: drop the reference
            self._cache = None
        return parts[index]

    def _project(self, x: Tensor) -> list[Tensor]:
        """The input projections of x (the extra rows' output dropped)."""
        out = planned_linear(x, self.weight, self.bias, self.gemm_plan)
        return list(out.split(self.widths + [self.n_rows - self.base_rows], dim=-1))[:-1]

    def unfused(self) -> list[nn.Linear]:
        """Exact copies of the original base projections."""
        linears, start = [], 0
        for width, has_bias in zip(self.widths, self.has_bias):
            linear = nn.Linear(self.d_in, width, bias=has_bias, device="meta")
            linear.weight = nn.Parameter(self.weight[start : start + width, : self.d_in].clone(memory_format=torch.contiguous_format), requires_grad=False)
            if has_bias:
                linear.bias = nn.Parameter(self.bias[start : start + width].clone(), requires_grad=False)
            linears.append(linear)
            start += width
        return linears

    def base_weight(self, index: int) -> Tensor:
        """A view of input projection `index`'s base weight inside the fused matrix."""
        start = sum(self.widths[:index])
        return self.weight[start : start + self.widths[index], : self.d_in]


class FusedInputSlice(nn.Module):
    """Stands where q_proj (k_proj, ...) stood; returns its part of the shared fused GEMM."""

    def __init__(self, group: FusedInputProjections, index: int) -> None:
        super().__init__()
        refer_to(self, "group", group)  # the group is registered once, on the sub-block
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        return f"index={self.index}, out_features={self.group.widths[self.index]}"


class FusedOutputProjection(nn.Module):
    """The output projection as one GEMM, with `extra_rows` rows and `extra_cols` columns reserved for an
    adapter (zeros until written). Here the input must already be `n_cols` wide and the extra rows'
    output is dropped; a method's subclass overrides `forward` to feed and read them."""

    gemm_plan: GemmPlan | None = None  # how the GEMM runs (fflora.fastpath); None: F.linear

    def __init__(self, base: nn.Linear, name: str, extra_rows: int = 0, extra_cols: int = 0) -> None:
        super().__init__()
        self.name = name
        self.d_core, self.d_out = base.in_features, base.out_features
        self.extra_rows, self.extra_cols = extra_rows, extra_cols
        self.n_rows = aligned(self.d_out + extra_rows, extra_rows)
        self.n_cols = aligned(self.d_core + extra_cols, extra_cols)
        ref = base.weight
        weight = torch.zeros(self.n_rows, self.n_cols, dtype=ref.dtype, device=ref.device)
        weight[: self.d_out, : self.d_core] = base.weight.detach()
        self.register_buffer("weight", weight)
        if base.bias is not None:
            bias = torch.zeros(self.n_rows, dtype=ref.dtype, device=ref.device)
            bias[: self.d_out] = base.bias.detach()
            self.register_buffer("bias", bias)
        else:
            self.bias = None

    def forward(self, c: Tensor) -> Tensor:
        out = planned_linear(c, self.weight, self.bias, self.gemm_plan)
        return out[..., : self.d_out] if self.n_rows != self.d_out else out

    def unfused(self) -> nn.Linear:
        """An exact copy of the original base projection."""
        linear = nn.Linear(self.d_core, self.d_out, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.base_weight().clone(memory_format=torch.contiguous_format), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias[: self.d_out].clone(), requires_grad=False)
        return linear

    def base_weight(self) -> Tensor:
        """A view of the base weight inside the fused matrix."""
        return self.weight[: self.d_out, : self.d_core]

    def extra_repr(self) -> str:
        return (f"in={self.d_core}+{self.extra_cols} (padded {self.n_cols}), "
                f"out={self.d_out}+{self.extra_rows} (padded {self.n_rows})")


def unwrap(module: nn.Module) -> nn.Linear:
    """The base nn.Linear of a projection, whether adapted (training form) or plain."""
    if isinstance(module, WrappedProjection):
        return module.base
    if type(module) is not nn.Linear:
        raise ValueError(f"cannot fuse a {type(module).__name__}; fflora fuses plain torch.nn.Linear projections")
    return module


def install_fused(holder: nn.Module, spec, group: FusedInputProjections, output: FusedOutputProjection) -> None:
    """Put a sub-block's fused GEMMs where its projections were (`spec` names them on `holder`)."""
    holder.ffba_fused_inputs = group
    for index, p in enumerate(spec.inputs):
        setattr(holder, p, FusedInputSlice(group, index))
    setattr(holder, spec.output, output)


def unfused_projections(holder: nn.Module, spec) -> tuple[list[nn.Linear], nn.Linear]:
    """Take a sub-block's fused GEMMs out: (its input projections, its output projection), rebuilt as
    the base nn.Linear modules. The caller puts them (or wrappers around them) back."""
    inputs = holder.ffba_fused_inputs.unfused()
    output = getattr(holder, spec.output).unfused()
    del holder.ffba_fused_inputs
    return inputs, output


def fuse_plain(model: nn.Module) -> None:
    """The fused form of a model without adapters: the latency lower bound of every method."""
    for _, _, name, spec, holder in sub_blocks(model):
        inputs = [unwrap(getattr(holder, p)) for p in spec.inputs]
        install_fused(holder, spec, FusedInputProjections(inputs, name), FusedOutputProjection(unwrap(getattr(holder, spec.output)), name))


def unfuse_plain(model: nn.Module) -> None:
    """Undo `fuse_plain` (or a bank's fused form): the plain nn.Linear projections again."""
    for _, _, _, spec, holder in sub_blocks(model):
        inputs, output = unfused_projections(holder, spec)
        for p, base in zip(spec.inputs, inputs):
            setattr(holder, p, base)
        setattr(holder, spec.output, output)


def gemm_modules(model: nn.Module) -> list[nn.Module]:
    """Every fused GEMM of a fused model, in module order."""
    return [m for m in model.modules() if isinstance(m, (FusedInputProjections, FusedOutputProjection))]


def base_projection_weights(model: nn.Module):
    """Yield (name, weight) of every base projection, in training, fused or plain form."""
    for i, _, _, spec, holder in sub_blocks(model):
        for p in (*spec.inputs, spec.output):
            module = getattr(holder, p)
            if isinstance(module, FusedInputSlice):
                weight = module.group.base_weight(module.index)
            elif isinstance(module, FusedOutputProjection):
                weight = module.base_weight()
            else:
                weight = unwrap(module).weight
            yield f"layers.{i}.{spec.module}.{p}", weight
