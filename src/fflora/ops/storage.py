"""How one fused GEMM's weights are stored and run: one class per weight format, behind one interface.

A fused GEMM is an `n_rows` x `n_cols` matrix: its first `base_out` rows are the base model's, the
rest an adapter's (activations it produces); its first `d_main` columns take the base input, the rest
an adapter's activations appended to it. `GemmStorage` is what every format offers: write an adapter's
rows or columns, read base rows back, run the GEMM over the whole matrix or a leading window.

    DenseStorage   the whole matrix in the model's dtype: one GEMM, laid out as a GEMM plan says
                   (`fflora.ops.gemm`, `fflora.fastpath.plan`)
    Int8Storage    every row weight-only int8, one scale per row (`fflora.ops.int8`)
    Int4Storage    the base rows weight-only int4, groups of 32 along the input (`fflora.ops.int4`)

The quantized formats (`QuantizedStorage`) keep an adapter's columns in float32 beside the quantized
rows (stored transposed: a one-row product with such a block takes ~1.5 us here, PyTorch's bfloat16 GEMM
of that shape ~20 us), and its rows as the format's precision needs: int8 quantizes each adapter row on
its own (with the base's, own scales), int4 keeps them apart in float32 (in int4 groups they cost a
random FFBA adapter of std 0.02 half its next-token agreement with the float32 model: 47% against 91%
apart; in int8 apart measured no better, 79.4% against 79.7%: `results/adapter-precision/`). Writing an
adapter never changes how the base rows are quantized. A new format (a GPU kernel) is a
`QuantizedStorage` subclass with its `quantize`, `requantize`, `held_views`, `held_linear`, `base_rows`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import int4
from .gemm import GemmPlan, HoldsPackedCopy, planned_linear, set_gemm_plan
from .int8 import dequantize_rows, int8_linear, quantize_rows


class GemmStorage(nn.Module):
    """The weights of one fused GEMM in one format (see the module docstring); `bias` (n_rows or None)."""

    quantized = False
    keeps_dtype: tuple[str, ...] = ()  # buffers that keep their dtype when the model is cast (weight_formats)
    n_rows: int
    n_cols: int
    base_out: int
    d_main: int

    def _shape(self, n_rows: int, n_cols: int, base_out: int, d_main: int) -> None:
        self.n_rows, self.n_cols, self.base_out, self.d_main = n_rows, n_cols, base_out, d_main

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype the GEMM takes and gives."""
        raise NotImplementedError

    @property
    def write_dtype(self) -> torch.dtype:
        """The dtype to keep an adapter's values in before they are written."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def write_rows(self, start: int, values: Tensor) -> None:
        """Set rows start.. (adapter rows: start >= base_out) of the main columns (values: rows x d_main)."""
        raise NotImplementedError

    def write_cols(self, start: int, values: Tensor) -> None:
        """Set columns start.. (start >= d_main) of the leading values.shape[0] rows."""
        raise NotImplementedError

    def base_rows(self, start: int, stop: int) -> Tensor:
        """Base rows start..stop of the main columns (dequantized where quantized)."""
        raise NotImplementedError

    def gemm(self, x: Tensor, rows: int | None = None, cols: int | None = None) -> Tensor:
        """x @ W[:rows, :cols].T + bias[:rows] (x is `cols` wide); the whole matrix by default (the form a
        compiled step traces: no cached views)."""
        raise NotImplementedError

    def _views(self, rows: int, cols: int) -> tuple:
        """Cached views of a leading window (slicing on every call costs more than the small GEMM columns it
        selects, for the bank's windows); rebuilt when the storage moves or is replaced."""
        first = next(iter(self.buffers()))
        cache = self.__dict__.get("_view_cache")
        if cache is None or cache[0] != first.data_ptr():
            cache = self.__dict__["_view_cache"] = (first.data_ptr(), {})
        views = cache[1].get((rows, cols))
        if views is None:
            views = cache[1][rows, cols] = self._window(rows, cols)
        return views

    def _window(self, rows: int, cols: int) -> tuple:
        raise NotImplementedError


class DenseStorage(HoldsPackedCopy, GemmStorage):
    """The whole matrix in one tensor of the model's dtype: one GEMM, `gemm_plan` choosing its layout."""

    gemm_plan: GemmPlan | None = None  # how the GEMM runs (fflora.fastpath.plan); None: F.linear
    packed_handle: int | None = None  # the "packed" layout's oneDNN copy of `weight` (`ops.gemm.set_gemm_plan`)
    packed_stale: bool = False  # the weight was written since: the copy is packed again before the next GEMM

    def __init__(self, weight: Tensor, bias: Tensor | None, base_out: int, d_main: int) -> None:
        super().__init__()
        self._shape(weight.shape[0], weight.shape[1], base_out, d_main)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def write_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def write_rows(self, start: int, values: Tensor) -> None:
        self.weight[start : start + values.shape[0], : self.d_main] = values.to(self.weight.dtype)
        self.packed_stale = True

    def write_cols(self, start: int, values: Tensor) -> None:
        rows, cols = values.shape
        self.weight[:rows, start : start + cols] = values.to(self.weight.dtype)
        self.packed_stale = True

    def base_rows(self, start: int, stop: int) -> Tensor:
        return self.weight[start:stop, : self.d_main]

    def gemm(self, x: Tensor, rows: int | None = None, cols: int | None = None) -> Tensor:
        if self.packed_handle is not None:  # the whole packed matrix: zero columns past the window, rows cut
            if self.packed_stale:  # written since packed (an adapter loaded): pack again, once
                set_gemm_plan(self, self.gemm_plan)
                self.packed_stale = False
            if x.shape[-1] < self.n_cols:
                x = F.pad(x, (0, self.n_cols - x.shape[-1]))
            out = planned_linear(x, self.weight, self.bias, packed_handle=self.packed_handle)
            return out if rows is None or rows == self.n_rows else out[..., :rows]
        if rows is None and cols is None:
            return planned_linear(x, self.weight, self.bias, self.gemm_plan)
        weight, bias = self._views(rows or self.n_rows, cols or self.n_cols)
        return planned_linear(x, weight, bias, self.gemm_plan)

    def _window(self, rows: int, cols: int) -> tuple:
        return self.weight[:rows, :cols], None if self.bias is None else self.bias[:rows]


class QuantizedStorage(GemmStorage):
    """Weight-only quantized rows, bfloat16 activations; an adapter's columns a float32 block of their own,
    stored transposed (`cols_t`: extra columns x n_rows). Its rows are quantized with the base's (each with
    its own scales: `rows_apart` False) or kept apart in float32, transposed (`rows_t`: d_main x extra rows;
    `rows_apart` True), as the format's precision needs. A subclass is one format: `quantize` (the rows it
    holds, from dense), `requantize` (rewrite some), `held_views` and `held_linear` (run a leading window of
    them), `base_rows`."""

    quantized = True
    keeps_dtype = ("rows_t", "cols_t")
    rows_apart: bool

    def __init__(self, dense: DenseStorage) -> None:
        super().__init__()
        self._shape(dense.n_rows, dense.n_cols, dense.base_out, dense.d_main)
        weight = dense.weight
        self.held = self.base_out if self.rows_apart else self.n_rows  # the rows in the quantized matrix
        self.quantize(weight[: self.held, : self.d_main])
        apart = self.rows_apart and self.n_rows > self.base_out
        self.register_buffer("rows_t", weight[self.base_out :, : self.d_main].t().float().contiguous() if apart else None)
        self.register_buffer("cols_t", weight[:, self.d_main :].t().float().contiguous() if self.n_cols > self.d_main else None)
        self.register_buffer("bias", None if dense.bias is None else dense.bias.to(torch.bfloat16))

    def quantize(self, rows: Tensor) -> None:
        """Store `rows` (the held rows x d_main, dense) in this format."""
        raise NotImplementedError

    def requantize(self, start: int, values: Tensor) -> None:
        """Rewrite held rows start.. (adapter rows, each quantized on its own)."""
        raise NotImplementedError

    def held_views(self, rows: int) -> tuple:
        """What `held_linear` needs to compute the first `rows` held rows (views, cached per window)."""
        raise NotImplementedError

    def held_linear(self, x: Tensor, views: tuple, rows: int) -> Tensor:
        """x @ held rows[:rows].T (x: d_main wide, bfloat16)."""
        raise NotImplementedError

    @property
    def activation_dtype(self) -> torch.dtype:
        return torch.bfloat16

    @property
    def write_dtype(self) -> torch.dtype:
        return torch.float32

    def write_rows(self, start: int, values: Tensor) -> None:
        if start < self.base_out:
            raise ValueError(f"rows {start}.. are base rows; a {type(self).__name__} rewrites adapter rows only")
        if not self.rows_apart:
            self.requantize(start, values)
            return
        first = start - self.base_out
        self.rows_t[:, first : first + values.shape[0]] = values.t().float()

    def write_cols(self, start: int, values: Tensor) -> None:
        rows, cols = values.shape
        first = start - self.d_main
        self.cols_t[first : first + cols, :rows] = values.t().float()

    def gemm(self, x: Tensor, rows: int | None = None, cols: int | None = None) -> Tensor:
        if rows is None and cols is None:
            rows, cols = self.n_rows, self.n_cols
            views = (self.held_views(self.held), self.rows_t, self.cols_t, self.bias)
        else:
            rows, cols = rows or self.n_rows, cols or self.n_cols
            views = self._views(rows, cols)
        held, rows_t, cols_t, bias = views
        main = x[..., : self.d_main] if cols > self.d_main else x
        out = self.held_linear(main, held, min(rows, self.held))
        if rows_t is not None:
            flat = main.reshape(-1, self.d_main).float()
            extra = torch.mm(flat, rows_t).to(out.dtype).view(*out.shape[:-1], rows_t.shape[1])
            out = torch.cat([out, extra], dim=-1)
        if cols_t is not None:
            z = x[..., self.d_main : cols].reshape(-1, cols - self.d_main).float()
            out = out + torch.mm(z, cols_t).to(out.dtype).view(out.shape)
        return out if bias is None else out + bias

    def _window(self, rows: int, cols: int) -> tuple:
        rows_t = self.rows_t[:, : rows - self.base_out] if self.rows_t is not None and rows > self.base_out else None
        cols_t = self.cols_t[: cols - self.d_main, :rows] if cols > self.d_main else None
        return self.held_views(min(rows, self.held)), rows_t, cols_t, None if self.bias is None else self.bias[:rows]


class Int8Storage(QuantizedStorage):
    """Every row int8 with a bfloat16 scale of its own (`weight_int8`, `weight_scale`): an adapter's rows too,
    each quantized on its own, so writing them never changes the base's (keeping them float32 measured no
    better: `results/adapter-precision/`)."""

    rows_apart = False

    def quantize(self, rows: Tensor) -> None:
        values, scale = quantize_rows(rows)
        self.register_buffer("weight_int8", values)
        self.register_buffer("weight_scale", scale)

    def requantize(self, start: int, values: Tensor) -> None:
        stop = start + values.shape[0]
        self.weight_int8[start:stop], self.weight_scale[start:stop] = quantize_rows(values)

    def held_views(self, rows: int) -> tuple:
        return self.weight_int8[:rows], self.weight_scale[:rows]

    def held_linear(self, x: Tensor, views: tuple, rows: int) -> Tensor:
        return int8_linear(x, *views)

    def base_rows(self, start: int, stop: int) -> Tensor:
        return dequantize_rows(self.weight_int8[start:stop], self.weight_scale[start:stop], self.weight_scale.dtype)


class Int4Storage(QuantizedStorage):
    """The base rows int4 in groups of 32 along the input (`weight_int4`: packed, rows padded to the
    kernel's multiple; `weight_sz`: scales and offsets); an adapter's rows apart, float32 (in int4 groups
    they cost a strong adapter half its next-token agreement: `results/adapter-precision/`). ValueError
    when d_main is not a multiple of 32."""

    rows_apart = True

    def quantize(self, rows: Tensor) -> None:
        if self.d_main % int4.GROUP:
            raise ValueError(f"int4 groups {int4.GROUP} input columns; this GEMM has {self.d_main}: use int8")
        padded = torch.zeros(int4.round_rows(rows.shape[0]), self.d_main, dtype=torch.float32, device=rows.device)
        padded[: rows.shape[0]] = rows.float()
        q, scales_zeros = int4.quantize_groups(padded)
        self.register_buffer("weight_int4", int4.pack(q))
        self.register_buffer("weight_sz", scales_zeros)

    def held_views(self, rows: int) -> tuple:  # every packed row (the layout interleaves them): the output is cut
        return self.weight_int4, self.weight_sz

    def held_linear(self, x: Tensor, views: tuple, rows: int) -> Tensor:
        out = int4.int4_linear(x, *views)
        return out[..., :rows] if out.shape[-1] != rows else out

    def base_rows(self, start: int, stop: int) -> Tensor:
        return int4.dequantize(self.weight_int4, self.weight_sz, self.d_main)[start:stop]


FORMATS: dict[str, type[QuantizedStorage]] = {"int8": Int8Storage, "int4": Int4Storage}

