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
from ..ops.storage import FORMATS, DenseStorage, GemmStorage
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


class FusedGemm(nn.Module):
    """One fused GEMM: `n_rows` x `n_cols`, of which the first `base_out` rows are the base model's and
    the first `d_main` columns take the base input (the rest: an adapter's rows and columns). Its weights
    and how they run are its `storage` (`fflora.ops.storage`: dense, int8 or int4 behind one interface);
    `to_format` swaps it, and writing an adapter (`write_rows`, `write_cols`) never changes how the base
    rows are stored."""

    n_rows: int
    base_out: int  # rows before the first adapter row
    n_cols: int
    d_main: int
    storage: GemmStorage

    @property
    def quantized(self) -> bool:
        return self.storage.quantized

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype the GEMM takes and gives (bfloat16 for quantized storage)."""
        return self.storage.activation_dtype

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype to keep values in before they are written (float32 when quantized: from full precision)."""
        return self.storage.write_dtype

    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def bias(self) -> Tensor | None:
        return self.storage.bias

    def _store(self, weight: Tensor, bias: Tensor | None) -> None:
        self.storage = DenseStorage(weight, bias, self.base_out, self.d_main)

    def write_rows(self, start: int, values: Tensor) -> None:
        """Set rows start.. (adapter rows) of the main columns (values: rows x d_main)."""
        self.storage.write_rows(start, values)

    def write_cols(self, start: int, values: Tensor) -> None:
        """Set columns start.. (start >= d_main) of the leading values.shape[0] rows."""
        self.storage.write_cols(start, values)

    def main_rows(self, start: int, stop: int) -> Tensor:
        """Base rows start..stop of the main columns (dequantized if quantized): a view when dense."""
        return self.storage.base_rows(start, stop)

    def gemm(self, x: Tensor, rows: int | None = None, cols: int | None = None) -> Tensor:
        """x @ W[:rows, :cols].T + bias[:rows] (x is `cols` wide); the whole matrix by default."""
        return self.storage.gemm(x, rows, cols)

    def to_format(self, weights: str) -> None:
        """Store the weights in quantized format `weights` ("int8", "int4"; `ops.storage.FORMATS`), from the
        dense storage; ValueError when the GEMM cannot take it (int4: input columns not a multiple of 32)."""
        if not self.storage.quantized:
            self.storage = FORMATS[weights](self.storage)


class FusedInputProjections(FusedGemm):
    """All input projections of one sub-block as one GEMM, with `extra_rows` rows and `extra_cols`
    columns reserved for an adapter (zeros until written). Here the GEMM's input must already be
    `n_cols` wide and the extra rows' output is dropped; a method's subclass overrides `_project`
    to feed and read them."""

    def __init__(self, bases: list[nn.Linear], name: str, extra_rows: int = 0, extra_cols: int = 0) -> None:
        super().__init__()
        self.name = name
        self.widths = [b.out_features for b in bases]
        self.d_in = self.d_main = bases[0].in_features
        self.extra_rows, self.extra_cols = extra_rows, extra_cols
        ref = bases[0].weight
        self.base_rows = self.base_out = rows = sum(self.widths)
        self.n_rows = aligned(rows + extra_rows, extra_rows)
        self.n_cols = aligned(self.d_in + extra_cols, extra_cols)
        weight = torch.zeros(self.n_rows, self.n_cols, dtype=ref.dtype, device=ref.device)
        weight[:rows, : self.d_in] = torch.cat([b.weight.detach() for b in bases], dim=0)
        self.has_bias = [b.bias is not None for b in bases]
        bias = None
        if any(self.has_bias):
            bias = torch.zeros(self.n_rows, dtype=ref.dtype, device=ref.device)
            start = 0
            for b, width in zip(bases, self.widths):
                if b.bias is not None:
                    bias[start : start + width] = b.bias.detach()
                start += width
        self._store(weight, bias)
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
        return list(self.gemm(x).split(self.widths + [self.n_rows - self.base_rows], dim=-1))[:-1]

    def unfused(self) -> list[nn.Linear]:
        """Exact copies of the original base projections (dense storage; int8: dequantized)."""
        linears, start = [], 0
        for width, has_bias in zip(self.widths, self.has_bias):
            linear = nn.Linear(self.d_in, width, bias=has_bias, device="meta")
            weight = self.main_rows(start, start + width).clone(memory_format=torch.contiguous_format)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if has_bias:
                linear.bias = nn.Parameter(self.bias[start : start + width].clone(), requires_grad=False)
            linears.append(linear)
            start += width
        return linears

    def base_weight(self, index: int) -> Tensor:
        """Input projection `index`'s base weight inside the fused matrix (a view when dense)."""
        start = sum(self.widths[:index])
        return self.main_rows(start, start + self.widths[index])


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


class FusedOutputProjection(FusedGemm):
    """The output projection as one GEMM, with `extra_rows` rows and `extra_cols` columns reserved for an
    adapter (zeros until written). Here the input must already be `n_cols` wide and the extra rows'
    output is dropped; a method's subclass overrides `forward` to feed and read them."""

    def __init__(self, base: nn.Linear, name: str, extra_rows: int = 0, extra_cols: int = 0) -> None:
        super().__init__()
        self.name = name
        self.d_core, self.d_out = base.in_features, base.out_features
        self.d_main, self.base_out = self.d_core, self.d_out
        self.extra_rows, self.extra_cols = extra_rows, extra_cols
        self.n_rows = aligned(self.d_out + extra_rows, extra_rows)
        self.n_cols = aligned(self.d_core + extra_cols, extra_cols)
        ref = base.weight
        weight = torch.zeros(self.n_rows, self.n_cols, dtype=ref.dtype, device=ref.device)
        weight[: self.d_out, : self.d_core] = base.weight.detach()
        bias = None
        if base.bias is not None:
            bias = torch.zeros(self.n_rows, dtype=ref.dtype, device=ref.device)
            bias[: self.d_out] = base.bias.detach()
        self._store(weight, bias)

    def forward(self, c: Tensor) -> Tensor:
        out = self.gemm(c)
        return out[..., : self.d_out] if self.n_rows != self.d_out else out

    def unfused(self) -> nn.Linear:
        """An exact copy of the original base projection (dense storage; int8: dequantized)."""
        linear = nn.Linear(self.d_core, self.d_out, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.base_weight().clone(memory_format=torch.contiguous_format), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias[: self.d_out].clone(), requires_grad=False)
        return linear

    def base_weight(self) -> Tensor:
        """The base weight inside the fused matrix (a view when dense)."""
        return self.main_rows(0, self.d_out)

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


def refresh_adapters(model: nn.Module, adapter_of) -> None:
    """Rewrite every adapted sub-block's rows/columns from its adapter (`adapter_of(layer, name)`, None
    where a sub-block has none) after the adapter's parameters changed in a fused model."""
    for _, layer, name, spec, holder in sub_blocks(model):
        adapter = adapter_of(layer, name)
        if adapter is not None:
            holder.ffba_fused_inputs.refresh_adapter_weights(adapter)
            getattr(holder, spec.output).refresh_adapter_weights(adapter)


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


def gemm_modules(model: nn.Module) -> list[FusedGemm]:
    """Every fused GEMM of a fused model, in module order."""
    return [m for m in model.modules() if isinstance(m, FusedGemm)]


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
