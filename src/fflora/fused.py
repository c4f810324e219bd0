"""Fused inference form: one GEMM for a sub-block's input projections, one for its output.

For a sub-block with input projections P_1..P_k (q|k|v or gate|up), output projection P_out and
an FFBA adapter, `fuse` builds

    W_in  = [ W_1  s_b B_b1 ]        acting on [u; z_b_in]   -> [p_1; ...; p_k; z_f]
            [ ...  ...      ]
            [ W_k  s_b B_bk ]
            [ A_f  0        ]

    W_out = [ W_o  s_f B_f ]         acting on [c; phi(z_f)] -> [y; z_b_out]
            [ A_b  0       ]

The fused matrices are the only copy of the base weights while fused (no duplicate memory);
`unfuse` rebuilds the original nn.Linear modules from them bit for bit. Adapter parameters stay
where they are and the adapter rows/columns are derived from them, so replacing an adapter in a
fused model rewrites only those rows/columns (`refresh_adapter_weights`).

The model's own attention/MLP code is kept: it calls q_proj, k_proj and v_proj in turn on the
same input, so the first of them runs the fused GEMM and its siblings return views of the result.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .adapter import NEXT_SUB_BLOCK, PHI, LayerState, SubBlockAdapter
from .models.architectures import sub_blocks
from .fastpath.compile import clear_compiled
from .ops.gemm import GemmPlan, planned_linear
from .layers import AdaptedInputProjection, AdaptedOutputProjection, WrappedProjection, _refer_to
from .zflora import is_zflora


# The adapter rows/columns are padded with zeros so that every fused GEMM dimension they widen is
# a multiple of ALIGN. CPU GEMM kernels slow down sharply on odd sizes: on SmolLM2 at batch 8 x 128,
# prefill took 1.82 s with r=8, 2.26 s with r=10 and 1.90 s with r=16 before this padding.
ALIGN = 8


def _aligned(n: int, extra: int) -> int:
    """n rounded up to a multiple of ALIGN when an adapter widened it (extra > 0), else n."""
    return -(-n // ALIGN) * ALIGN if extra else n


def _zero_padded(parts: list[Tensor], width: int) -> Tensor:
    """cat(parts) along the last dimension, with zeros up to `width`."""
    pad = width - sum(p.shape[-1] for p in parts)
    if pad:
        parts = [*parts, parts[0].new_zeros(*parts[0].shape[:-1], pad)]
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


class FusedInputProjections(nn.Module):
    """All input projections of one sub-block (plus FA down rows and BA up columns) as one GEMM."""

    gemm_plan: GemmPlan | None = None  # how the GEMM runs (fflora.fastpath); None: F.linear

    def __init__(self, bases: list[nn.Linear], name: str, fa_rank: int = 0, ba_in_rank: int = 0, phi: str = "identity",
                 state: LayerState | None = None) -> None:
        """`fa_rank` extra rows and `ba_in_rank` extra columns are reserved for the adapter (zeros until
        written); `state` is the layer's FFBA state, which they read and write."""
        super().__init__()
        self.name = name
        self.layer_state = state
        self.widths = [b.out_features for b in bases]
        self.d_in = bases[0].in_features
        self.fa_rank, self.ba_in_rank = fa_rank, ba_in_rank
        self.phi = PHI[phi]
        ref = bases[0].weight
        self.base_rows = rows = sum(self.widths)
        self.n_rows = _aligned(rows + fa_rank, fa_rank)
        self.n_cols = _aligned(self.d_in + ba_in_rank, ba_in_rank)
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

    def refresh_adapter_weights(self, adapter: SubBlockAdapter) -> None:
        """Write the adapter's rows/columns in place; the base block is not touched."""
        rows, d_in = self.base_rows, self.d_in
        if self.fa_rank:
            self.weight[rows : rows + self.fa_rank, :d_in] = adapter.fa_down.detach().to(self.weight.dtype)
        if self.ba_in_rank:
            self.weight[:rows, d_in : d_in + self.ba_in_rank] = (adapter.ba_scale * adapter.ba_up.detach()).to(self.weight.dtype)

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
        if self.ba_in_rank or self.fa_rank:
            state = self.layer_state.current()
        inp = x
        if self.ba_in_rank:
            z = state.into.get(self.name)
            if z is None:  # no BA state arrived (cannot happen inside an FFBA layer)
                raise RuntimeError(f"fused {self.name} expected backward-adapter input, found none")
            inp = _zero_padded([x, z.to(x.dtype)], self.n_cols)
        out = planned_linear(inp, self.weight, self.bias, self.gemm_plan)
        parts = list(out.split(self.widths + [self.n_rows - self.base_rows], dim=-1))
        tail = parts.pop()  # FA rows, then zero padding
        if self.fa_rank:
            state.fa[self.name] = self.phi(tail[..., : self.fa_rank])
        return parts

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


class FusedInputSlice(nn.Module):
    """Stands where q_proj (k_proj, ...) stood; returns its part of the shared fused GEMM."""

    def __init__(self, group: FusedInputProjections, index: int) -> None:
        super().__init__()
        _refer_to(self, "group", group)  # the group is registered once, on the sub-block
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        return f"index={self.index}, out_features={self.group.widths[self.index]}"


class FusedOutputProjection(nn.Module):
    """The output projection plus FA up columns and BA down rows, as one GEMM."""

    gemm_plan: GemmPlan | None = None  # how the GEMM runs (fflora.fastpath); None: F.linear

    def __init__(self, base: nn.Linear, name: str, fa_rank: int = 0, ba_out_rank: int = 0,
                 state: LayerState | None = None) -> None:
        """`fa_rank` extra columns and `ba_out_rank` extra rows are reserved for the adapter (zeros until
        written); `state` is the layer's FFBA state, which they read and write."""
        super().__init__()
        self.name = name
        self.layer_state = state
        self.d_core, self.d_out = base.in_features, base.out_features
        self.fa_rank, self.ba_out_rank = fa_rank, ba_out_rank
        self.n_rows = _aligned(self.d_out + self.ba_out_rank, self.ba_out_rank)
        self.n_cols = _aligned(self.d_core + self.fa_rank, self.fa_rank)
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

    def refresh_adapter_weights(self, adapter: SubBlockAdapter) -> None:
        """Write the adapter's rows/columns in place; the base block is not touched."""
        d_out, d_core = self.d_out, self.d_core
        if self.fa_rank:
            self.weight[:d_out, d_core : d_core + self.fa_rank] = (adapter.fa_scale * adapter.fa_up.detach()).to(self.weight.dtype)
        if self.ba_out_rank:
            self.weight[d_out : d_out + self.ba_out_rank, :d_core] = adapter.ba_down.detach().to(self.weight.dtype)

    def forward(self, c: Tensor) -> Tensor:
        if not (self.fa_rank or self.ba_out_rank):
            return planned_linear(c, self.weight, self.bias, self.gemm_plan)
        state = self.layer_state.current()
        inp = _zero_padded([c, state.fa.pop(self.name).to(c.dtype)], self.n_cols) if self.fa_rank else c
        out = planned_linear(inp, self.weight, self.bias, self.gemm_plan)
        if self.ba_out_rank:
            state.into[NEXT_SUB_BLOCK[self.name]] = out[..., self.d_out : self.d_out + self.ba_out_rank]
        return out[..., : self.d_out] if self.n_rows != self.d_out else out

    def unfused(self) -> nn.Linear:
        linear = nn.Linear(self.d_core, self.d_out, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight[: self.d_out, : self.d_core].clone(memory_format=torch.contiguous_format), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias[: self.d_out].clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return f"in={self.d_core}+{self.fa_rank} (padded {self.n_cols}), out={self.d_out}+{self.ba_out_rank} (padded {self.n_rows})"


def _unwrap(module: nn.Module) -> nn.Linear:
    """The base nn.Linear of a projection, whether adapted (training form) or plain."""
    if isinstance(module, WrappedProjection):
        return module.base
    if type(module) is not nn.Linear:
        raise ValueError(f"cannot fuse a {type(module).__name__}; fflora fuses plain torch.nn.Linear projections")
    return module


def _adapter_of(layer: nn.Module, name: str) -> SubBlockAdapter | None:
    return getattr(getattr(layer, "ffba", None), name, None)


def fuse(model: nn.Module, max_adapters: int | None = None, rank_budget: int | None = None) -> nn.Module:
    """Switch `model` to the fused inference form, in place; returns it.

    Works with or without adapters (without: the fused base model, the latency lower bound).
    The fused form is for inference: adapter parameters receive no gradient through it.

    With `max_adapters=K` the fused GEMMs reserve room for an adapter bank of up to K adapters
    (`rank_budget`: their total rank per rank space, default 16 * K), loaded with
    `fflora.load_adapter(model, path, adapter_name=...)` and chosen per batch row with
    `adapter_names=` (see `fflora.bank`).
    """
    if max_adapters is not None:
        from .bank import fuse_with_bank

        return fuse_with_bank(model, max_adapters, rank_budget)
    if getattr(model, "ffba_fused", False):
        return model
    _embedding_grad_hook(model, on=False)
    if is_zflora(model):
        from .zflora.fused import fuse_zflora

        fuse_zflora(model)
        model.ffba_fused = True
        return model
    for _, layer, name, spec, holder in sub_blocks(model):
        adapter = _adapter_of(layer, name)
        inputs, output = [_unwrap(getattr(holder, p)) for p in spec.inputs], _unwrap(getattr(holder, spec.output))
        if adapter is None:
            group, output = FusedInputProjections(inputs, name), FusedOutputProjection(output, name)
        else:
            state = adapter.layer_state
            group = FusedInputProjections(inputs, name, adapter.fa_rank, adapter.ba_in_rank, adapter.phi_name, state)
            output = FusedOutputProjection(output, name, adapter.fa_rank, adapter.ba_out_rank, state)
            group.refresh_adapter_weights(adapter)
            output.refresh_adapter_weights(adapter)
        install_fused(holder, spec, group, output)
    model.ffba_fused = True
    return model


def _embedding_grad_hook(model: nn.Module, on: bool) -> None:
    """Switch the hook that makes the embeddings' output require grad (`apply_adapter` sets it for
    reentrant gradient checkpointing). The fused form is for inference, and the hook's in-place
    `requires_grad_` would split a `torch.compile` graph in two, so it is off while fused."""
    if on and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif not on and hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def install_fused(holder: nn.Module, spec, group: FusedInputProjections, output: FusedOutputProjection) -> None:
    """Put a sub-block's fused GEMMs where its projections were (`spec` names them on `holder`)."""
    holder.ffba_fused_inputs = group
    for index, p in enumerate(spec.inputs):
        setattr(holder, p, FusedInputSlice(group, index))
    setattr(holder, spec.output, output)


def unfuse(model: nn.Module) -> nn.Module:
    """Switch a fused model back to the training form (or the plain base), in place; returns it.

    A model fused with an adapter bank becomes the plain base model: the bank and its adapters
    (copies of what was loaded from disk) are dropped.
    """
    if not getattr(model, "ffba_fused", False):
        return model
    clear_compiled(model)
    if getattr(model, "ffba_gemm_mode", "standard") != "standard":
        from .fastpath.plan import clear_gemm_plans

        clear_gemm_plans(model)
    if getattr(model, "ffba_bank", None) is not None:
        from .bank import unfuse_bank

        unfuse_bank(model)
    from .model import has_ffba  # fflora.model imports this module

    if has_ffba(model):  # adapters (either family) train again
        _embedding_grad_hook(model, on=True)
    if is_zflora(model):
        from .zflora.fused import unfuse_zflora

        unfuse_zflora(model)
        model.ffba_fused = False
        return model
    for _, layer, name, spec, holder in sub_blocks(model):
        adapter = _adapter_of(layer, name)
        for index, (p, base) in enumerate(zip(spec.inputs, holder.ffba_fused_inputs.unfused())):
            setattr(holder, p, AdaptedInputProjection(base, adapter, index) if adapter is not None else base)
        base = getattr(holder, spec.output).unfused()
        setattr(holder, spec.output, AdaptedOutputProjection(base, adapter) if adapter is not None else base)
        del holder.ffba_fused_inputs
    model.ffba_fused = False
    return model


def refresh_adapter_weights(model: nn.Module) -> None:
    """After adapter parameters changed in a fused model, rewrite their fused rows/columns in place."""
    if is_zflora(model):
        from .zflora.fused import refresh_zflora_weights

        return refresh_zflora_weights(model)
    for _, layer, name, spec, holder in sub_blocks(model):
        adapter = _adapter_of(layer, name)
        if adapter is not None:
            holder.ffba_fused_inputs.refresh_adapter_weights(adapter)
            getattr(holder, spec.output).refresh_adapter_weights(adapter)


def base_projection_weights(model: nn.Module):
    """Yield (name, weight) of every base projection, in training, fused or plain form."""
    for i, _, _, spec, holder in sub_blocks(model):
        for p in (*spec.inputs, spec.output):
            module = getattr(holder, p)
            if isinstance(module, FusedInputSlice):
                group = module.group
                start = sum(group.widths[: module.index])
                weight = group.weight[start : start + group.widths[module.index], : group.d_in]
            elif isinstance(module, FusedOutputProjection):
                weight = module.weight[: module.d_out, : module.d_core]
            else:
                weight = _unwrap(module).weight
            yield f"layers.{i}.{spec.module}.{p}", weight
