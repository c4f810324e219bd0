"""The adapter bank: many FFBA adapters resident in one fused model, chosen per token.

Design: `shared/design/adapter-bank.md`. Each sub-block's two fused GEMMs reserve room for the
adapter rows/columns of several adapters. The room is organised in four *rank spaces*, each
shared by all layers:

    fa.attn, fa.mlp   FA bottleneck of the attention / MLP sub-block: FA down rows of the input
                      GEMM and FA up columns of the output GEMM
    ba.attn, ba.mlp   BA leaving the attention / MLP sub-block: BA down rows of its output GEMM
                      and BA up columns of the next sub-block's input GEMM

An adapter occupies a contiguous range in each space it uses (its rank there, no padding to the
largest rank; an FA-only adapter takes no BA room). Loading writes its rows/columns into free
ranges in place, deleting zeroes them: O(r * d) per adapter, never a copy of the base weights.

A forward pass names an adapter per batch row (or, for packed batches, per token). The adapter
activations that leave a GEMM (z_f, z_b) are multiplied by a per-token 0/1 mask that keeps only
the columns of the token's adapter; base tokens get an all-zero mask. Each GEMM covers a leading
*window* of its space: the adapters present in the batch are kept packed at the front (moved
there, from the adapters' stored weights, when a batch needs it), so a step costs the base GEMMs
plus the ranks of the adapters present, not of all resident ones.

Compiled (`fflora.compile_decode` on a bank model) the windows are fixed instead: every GEMM covers
its whole room, the per-token masks alone choose the adapters, so one graph serves every mix of
adapters (no re-arranging, no recompiling as the mix changes). The selection then lives in the
bank's `BankStep`, a plain object the compiled graph can read (it cannot read a context variable);
it is set for the whole of a `generate` (or a `select_adapters` block), not per forward call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...models.architectures import decoder_layers, sub_blocks
from ...utils.classes import BASE, extend, restore
from ..fused import ALIGN, FusedInputProjections, FusedOutputProjection, install_fused, unfuse_plain, unwrap, zero_padded
from ..fused_state import fused_model_of
from ..layers import BASE_NAME
from .adapter import PHI
from .config import FFBAConfig
from .model import sub_block_ranks

SPACES = ("fa.attn", "fa.mlp", "ba.attn", "ba.mlp")
_PREVIOUS = {"attn": "mlp", "mlp": "attn"}  # whose BA arrives at a sub-block's inputs


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def adapter_space_ranks(config: FFBAConfig) -> dict[str, int]:
    """The rank an adapter with `config` takes in each rank space (0: it does not use it)."""
    ranks = {}
    for s in ("attn", "mlp"):
        ranks[f"fa.{s}"] = config.r if config.forward and s in config.sub_blocks else 0
        ranks[f"ba.{s}"] = config.rank_backward if config.backward and s in config.sub_blocks else 0
    return ranks


@dataclass
class BankEntry:
    """One resident adapter: its configuration, its weights (canonical keys) and where it sits."""

    config: FFBAConfig
    state: dict[str, Tensor]
    ranks: dict[str, int]
    offsets: dict[str, int] = field(default_factory=dict)

    def end(self, space: str) -> int:
        return self.offsets[space] + self.ranks[space]


@dataclass
class BankSelection:
    """Which adapter each token of one forward pass uses, resolved against the bank's layout.

    windows[space]: the aligned width of that space each GEMM covers; masks[space]: (rows, tokens,
    window) 0/1 masks that keep each token's own adapter columns; fa_phi[space]: for FA spaces with
    a non-identity phi present, (phi, column mask) pairs. `pending[space]` carries the activations
    of a space from the GEMM that produces them to the one that consumes them while the pass runs.
    """

    windows: dict[str, int]
    masks: dict[str, Tensor]
    fa_phi: dict[str, list[tuple]]
    pending: dict[str, Tensor] = field(default_factory=dict)

    def mask(self, space: str, z: Tensor) -> Tensor | None:
        """The mask of `space` for activations `z`, one per batch row (or per packed token); None
        when every token uses the one adapter that fills the window (nothing to mask).

        generate() repeats each row for beams or num_return_sequences: the names are repeated
        the same way, once per pass.
        """
        mask = self.masks[space]
        if mask is None:
            return None
        if mask.shape[1] not in (1, z.shape[1]):
            raise ValueError(f"the packed segment lengths add up to {mask.shape[1]} tokens but the batch has "
                             f"{z.shape[1]}; give one length per request, summing to the packed row's length")
        rows, names = z.shape[0], mask.shape[0]
        if rows != names:
            if rows % names:
                raise ValueError(f"adapter_names has {names} entries but the batch has {rows} rows; give one name per row")
            self.masks = {s: None if m is None else m.repeat_interleave(rows // names, dim=0) for s, m in self.masks.items()}
            mask = self.masks[space]
        return mask

    def fa_activation(self, space: str, z: Tensor) -> Tensor:
        """phi(z) of each token's own FA columns, zero elsewhere (phi(0) = 0 for every phi)."""
        mask = self.mask(space, z)
        terms = self.fa_phi.get(space)
        if mask is None:
            return PHI[terms[0][0]](z) if terms else z
        if not terms:
            return z * mask
        return sum(PHI[phi](z) * (mask * cols) for phi, cols in terms)


_SELECTION: ContextVar[BankSelection | None] = ContextVar("fflora_bank_selection", default=None)


@dataclass
class BankStep:
    """How the bank's GEMMs find the current selection. `fixed` (a compiled bank): from `selection`
    here, with windows of the whole room; otherwise from the `_SELECTION` context variable (each
    thread or task its own), with windows of the adapters present."""

    fixed: bool = False
    selection: BankSelection | None = None

    def current(self) -> BankSelection | None:
        return self.selection if self.fixed else _SELECTION.get()


class _BankGemm:
    """One fused GEMM of a bank: its base block plus a leading window of `row_space` rows (adapter
    activations it produces) and of `col_space` columns (the activations it consumes, appended to
    its input). Subclasses set the spaces, the base sizes and the room reserved for each."""

    row_space: str
    col_space: str
    step: BankStep  # the bank's, shared by all its GEMMs (set by AdapterBank)

    def bank_gemm(self, x: Tensor) -> tuple[BankSelection | None, Tensor, int]:
        """(the current selection, the GEMM's output, the width of its row window)."""
        sel = self.step.current()
        rows = sel.windows[self.row_space] if sel is not None and self.row_room else 0
        cols = sel.windows[self.col_space] if sel is not None and self.col_room else 0
        if cols:
            arriving = sel.pending.pop(self.col_space, None)
            if arriving is None:
                raise RuntimeError("an FFBA projection was called outside its model's forward pass (it takes the "
                                   "adapter activations of the sub-block before it); call the model, not a layer "
                                   "or a projection on its own")
            x = torch.cat([x, arriving], dim=-1)
        if self.step.fixed:  # the whole matrix, as a compiled step traces it (no cached window views)
            return sel, self.gemm(zero_padded([x], self.n_cols))[..., : self.base_size[0] + rows], rows
        return sel, self.gemm(x, self.base_size[0] + rows, self.base_size[1] + cols), rows


class BankInputProjections(_BankGemm, FusedInputProjections):
    """A sub-block's input projections with room for the FA down rows / BA up columns of a bank."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.row_space, self.col_space = f"fa.{self.name}", f"ba.{_PREVIOUS[self.name]}"
        self.base_size, self.row_room, self.col_room = (self.base_rows, self.d_in), self.extra_rows, self.extra_cols

    def _project(self, x: Tensor) -> list[Tensor]:
        sel, out, fa_w = self.bank_gemm(x)
        if not fa_w:
            return list(out.split(self.widths, dim=-1))
        *parts, z = out.split([*self.widths, fa_w], dim=-1)
        sel.pending[self.row_space] = sel.fa_activation(self.row_space, z)
        return parts


class BankOutputProjection(_BankGemm, FusedOutputProjection):
    """A sub-block's output projection with room for the FA up columns / BA down rows of a bank."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.row_space, self.col_space = f"ba.{self.name}", f"fa.{self.name}"
        self.base_size, self.row_room, self.col_room = (self.d_out, self.d_core), self.extra_rows, self.extra_cols

    def forward(self, c: Tensor) -> Tensor:
        sel, out, ba_w = self.bank_gemm(c)
        if not ba_w:
            return out
        y, z = out.split([self.d_out, ba_w], dim=-1)
        mask = sel.mask(self.row_space, z)
        sel.pending[self.row_space] = z if mask is None else z * mask
        return y


class AdapterBank:
    """The resident adapters of a fused model and their layout (its `FusedModel.bank`).

    Not an nn.Module: the fused GEMM modules it writes into are registered where the projections
    were, once. Use it through `fflora.load_adapter(..., adapter_name=)`, `delete_adapter`,
    `list_adapters`, the `adapter_names=` argument of forward/generate and `select_adapters`.
    `room[space]`: the rank each rank space holds (a bank built by `build_bank`: `rank_budget` in
    each; FFBA's single fused form: its one adapter's ranks, `ffba.fused`).
    """

    def __init__(self, model: nn.Module, max_adapters: int, room: dict[str, int]) -> None:
        self.max_adapters = max_adapters
        self.room = room
        self.rank_budget = max(room.values())
        self.num_layers = len(decoder_layers(model))
        # (layer index, sub-block name, input GEMM, output GEMM) of every sub-block.
        self.blocks = [(i, name, holder.ffba_fused_inputs, getattr(holder, spec.output))
                       for i, _, name, spec, holder in sub_blocks(model)]
        self.entries: dict[str, BankEntry] = {}
        self.step = BankStep()
        for _, _, group, out in self.blocks:
            group.step = out.step = self.step

    def fix_windows(self) -> None:
        """From now on every GEMM covers its whole room and selections hold for a whole generate
        (what a compiled decode step needs: one graph for every mix of adapters)."""
        self.step.fixed = True

    def hold(self, selection: BankSelection | None) -> None:
        """With fixed windows: the selection the compiled graph reads from now on (None: no adapter),
        for a caller that sets it before each forward pass, outside the graph (a continuous-batching
        engine, whose batch changes every step)."""
        if not self.step.fixed:
            raise ValueError("hold needs a bank with fixed windows (compiled); otherwise use select_adapters")
        self.step.selection = selection

    @contextlib.contextmanager
    def selected(self, adapter_names: Sequence[str], lengths: Sequence[int] | None = None, rearrange: bool = True):
        """Use `adapter_names` for the forward passes inside the block.

        One name per batch row, or, for a packed (varlen) batch of one row holding several requests,
        one name per request with `lengths` its token counts (as a continuous-batching engine builds
        them). `rearrange=False` leaves the adapters where they are (see `selection`).
        """
        selection = self.selection(adapter_names, lengths=lengths, rearrange=rearrange)
        if self.step.fixed:  # a compiled bank: the plain attribute its graph reads
            previous, self.step.selection = self.step.selection, selection
            try:
                yield
            finally:
                self.step.selection = previous
            return
        token = _SELECTION.set(selection)
        try:
            yield
        finally:
            _SELECTION.reset(token)

    def rank_used(self) -> dict[str, int]:
        """The rank resident adapters take in each rank space (what `/metrics` reports)."""
        return {s: sum(e.ranks[s] for e in self.entries.values()) for s in SPACES}

    @property
    def device(self) -> torch.device:
        return self.blocks[0][2].device  # read each time: the model may have moved since fusing

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (masks are in it)."""
        return self.blocks[0][2].activation_dtype

    # --- resident adapters ---

    def names(self) -> list[str]:
        return list(self.entries)

    def expected_shapes(self, config: FFBAConfig) -> dict[str, tuple[int, int]]:
        """Canonical weight keys and shapes of an adapter with `config` on this model."""
        shapes = {}
        for i, name, group, out in self.blocks:
            fa, ba_in, ba_out = sub_block_ranks(config, name, i, self.num_layers)
            prefix = f"layers.{i}.{name}."
            if fa:
                shapes[prefix + "fa_down"] = (fa, group.d_in)
                shapes[prefix + "fa_up"] = (out.d_out, fa)
            if ba_out:
                shapes[prefix + "ba_down"] = (ba_out, out.d_core)
            if ba_in:
                shapes[prefix + "ba_up"] = (group.base_rows, ba_in)
        return shapes

    def check_new_name(self, name: str) -> None:
        """ValueError unless an adapter called `name` could join the bank (valid, unused, a free slot)."""
        if not isinstance(name, str) or not name or name == BASE_NAME:
            raise ValueError(f"adapter_name must be a non-empty string other than {BASE_NAME!r}, got {name!r}")
        if name in self.entries:
            raise ValueError(f"an adapter named {name!r} is already loaded; delete it first "
                             f"(fflora.delete_adapter) or choose another name. Loaded: {self.names()}")
        if len(self.entries) >= self.max_adapters:
            raise ValueError(f"the adapter bank is full ({self.max_adapters} adapters: {self.names()}); delete one "
                             "with fflora.delete_adapter or fuse with a larger max_adapters")

    def add(self, name: str, config: FFBAConfig, state: dict[str, Tensor], source: str | None = None) -> None:
        """Make `name` resident: validate everything first, then write its rows/columns in place."""
        self.check_new_name(name)
        where = source or "the given state"
        expected = self.expected_shapes(config)
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"the adapter weights at {where} do not match their config: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}; the file is corrupt or was edited, save the adapter again")
        wrong = [f"{k}: {tuple(state[k].shape)} != {shape}" for k, shape in expected.items() if tuple(state[k].shape) != shape]
        if wrong:
            raise ValueError(f"the adapter weights at {where} have wrong shapes ({'; '.join(wrong[:4])}); save the adapter again")
        entry = BankEntry(config, self._kept(state), adapter_space_ranks(config))
        used = self.rank_used()
        over = [f"{s}: {used[s]} used + {entry.ranks[s]} > {self.room[s]}" for s in SPACES
                if used[s] + entry.ranks[s] > self.room[s]]
        if over:
            raise ValueError(f"the adapter bank has no room for {name!r} ({'; '.join(over)}); delete an adapter or "
                             "fuse with a larger rank_budget")
        if any(self._reach(self.entries, s) + entry.ranks[s] > self.room[s] for s in SPACES):
            self._arrange(list(self.entries))  # holes left by deleted adapters: pack the others first
        entry.offsets = {s: self._reach(self.entries, s) for s in SPACES}
        self.entries[name] = entry
        self._write(entry)

    def rewrite(self, name: str, state: dict[str, Tensor]) -> None:
        """New weights (same shapes) for the resident adapter `name`, written where it sits."""
        entry = self.entry(name)
        entry.state = self._kept(state)
        self._write(entry)

    def _kept(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A copy of `state` as the bank keeps it (on its device, in the precision its GEMMs are written from)."""
        kept = self.blocks[0][2].storage_dtype
        return {k: v.detach().to(self.device, kept, copy=True) for k, v in state.items()}

    def _reach(self, names: Sequence[str], space: str) -> int:
        """Where the furthest of `names` ends in `space` (their window must reach that far; for all
        resident adapters, where a new one would go)."""
        return max((self.entries[n].end(space) for n in names), default=0)

    def delete(self, name: str) -> None:
        """Zero the rows/columns of `name` and free its ranges."""
        entry = self.entry(name)
        self._write(entry, zero=True)
        del self.entries[name]

    def entry(self, name: str) -> BankEntry:
        """The resident adapter `name`; a ValueError listing the loaded adapters if there is none."""
        if name not in self.entries:
            raise ValueError(f"no adapter named {name!r} is loaded; loaded adapters: {self.names()} "
                             f"(and {BASE_NAME!r} for the base model)")
        return self.entries[name]

    @torch.no_grad()
    def _write(self, entry: BankEntry, zero: bool = False) -> None:
        """Write (or zero) the rows/columns of one adapter at its offsets, in every sub-block."""
        cfg, state, off = entry.config, entry.state, entry.offsets
        for i, name, group, out in self.blocks:
            fa, ba_in, ba_out = sub_block_ranks(cfg, name, i, self.num_layers)
            key = f"layers.{i}.{name}."

            def value(k: str, scale: float = 1.0) -> Tensor:
                return torch.zeros_like(state[key + k]) if zero else scale * state[key + k]

            if fa:
                group.write_rows(group.base_rows + off[f"fa.{name}"], value("fa_down"))
                out.write_cols(out.d_core + off[f"fa.{name}"], value("fa_up", cfg.scale_forward))
            if ba_in:
                group.write_cols(group.d_in + off[f"ba.{_PREVIOUS[name]}"], value("ba_up", cfg.scale_backward))
            if ba_out:
                out.write_rows(out.d_out + off[f"ba.{name}"], value("ba_down"))

    def _arrange(self, front: list[str]) -> None:
        """Pack the adapters named in `front` at the start of every space, the others after them;
        rewrite only the adapters that move (from their stored weights)."""
        order = [*front, *sorted((n for n in self.entries if n not in front), key=lambda n: self.entries[n].offsets["fa.attn"])]
        ends = dict.fromkeys(SPACES, 0)
        for n in order:
            entry = self.entries[n]
            new = {}
            for s in SPACES:
                new[s], ends[s] = ends[s], ends[s] + entry.ranks[s]
            if new != entry.offsets:
                entry.offsets = new
                self._write(entry)

    # --- selection ---

    def selection(self, names: Sequence[str], lengths: Sequence[int] | None = None,
                  rearrange: bool = True) -> BankSelection:
        """Resolve per-row names (or, with `lengths`, per-segment names of one packed row) into
        windows and per-token masks.

        With `rearrange`, the present adapters are first moved to the front of the bank if they are
        not there, so that the GEMMs cover only their ranks. Moving rewrites every adapter that
        shifts (~16 ms each on SmolLM2 on a CPU): worth it when one set of adapters serves many
        steps (`generate`), not when the set changes as requests come and go (a continuous-batching
        engine passes False and its windows reach the furthest adapter present). With fixed windows
        (`fix_windows`) nothing moves: every window is the whole room and every space is masked."""
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            if n != BASE_NAME:
                self.entry(n)
        present = list(dict.fromkeys(n for n in names if n != BASE_NAME))
        fixed = self.step.fixed
        if rearrange and not fixed and any(self._reach(present, s) > sum(self.entries[n].ranks[s] for n in present) for s in SPACES):
            self._arrange(present)
        ids = torch.tensor([present.index(n) if n != BASE_NAME else -1 for n in names], device=self.device)
        if lengths is not None:
            if len(lengths) != len(names):
                raise ValueError(f"{len(names)} adapter names for {len(lengths)} packed segments; give one name per segment")
            token_ids = ids.repeat_interleave(torch.tensor(list(lengths), device=self.device))[None, :]  # (1, tokens)
        else:
            token_ids = ids[:, None]  # (rows, 1): one adapter per row
        windows, masks, fa_phi = {}, {}, {}
        # One adapter for every token, in a bank whose windows cannot change under it (an unfixed one, or a
        # one-adapter bank: fixed windows over a bank that will hold more keep their masks, one graph for all)
        uniform = len(present) == 1 and BASE_NAME not in names and (not fixed or self.max_adapters == 1)
        for s in SPACES:
            reach = self._reach(present, s)
            width = self.room[s] if fixed else min(_round_up(reach), self.room[s])
            windows[s] = width
            if not width:
                continue
            alone = width == reach or self.max_adapters == 1  # the rest of the window can only be zeros (alignment)
            if uniform and alone and self.entries[present[0]].offsets[s] == 0:  # it fills the window
                masks[s] = None
                phi = self.entries[present[0]].config.phi
                if s.startswith("fa.") and phi != "identity":
                    fa_phi[s] = [(phi, None)]
                continue
            owner = torch.full((width,), -2, device=self.device)  # -2: no adapter (alignment padding)
            for k, n in enumerate(present):
                entry = self.entries[n]
                owner[entry.offsets[s] : entry.end(s)] = k
            masks[s] = (token_ids[..., None] == owner).to(self.dtype)
            if fixed:  # a compiled graph reads it: one graph for any number of rows
                torch._dynamo.maybe_mark_dynamic(masks[s], 0)
            if s.startswith("fa.") and any(self.entries[n].config.phi != "identity" for n in present):
                phis = {}
                for k, n in enumerate(present):
                    phis.setdefault(self.entries[n].config.phi, []).append(k)
                fa_phi[s] = [(phi, torch.isin(owner, torch.tensor(ks, device=self.device)).to(self.dtype)) for phi, ks in phis.items()]
        return BankSelection(windows, masks, fa_phi)


@functools.cache
def _bank_model_class(base_cls: type) -> type:
    """The bank subclass of a model class: `adapter_names=` on forward and on generate (one selection
    for all of its steps). Its forward shows the base signature plus `adapter_names`: generate reads the
    signature (e.g. to compute prefill logits for the last position only)."""

    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        if adapter_names is None:  # base model, or what an enclosing select_adapters chose
            return base_cls.forward(self, *args, **kwargs)
        with fused_model_of(self).bank.selected(adapter_names):
            return base_cls.forward(self, *args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """generate with one selection for all its forward passes (resolved once, not per step; a
        compiled decode step could not resolve it)."""
        if adapter_names is None:
            return base_cls.generate(self, *args, **kwargs)
        with fused_model_of(self).bank.selected(adapter_names):
            return base_cls.generate(self, *args, **kwargs)

    params = list(inspect.signature(base_cls.forward).parameters.values())
    extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    cut = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    forward.__signature__ = inspect.Signature([*params[:cut], extra, *params[cut:]])
    forward.__doc__ = base_cls.forward.__doc__
    return type(f"FFBABank{base_cls.__name__}", (base_cls,), {BASE: base_cls, "forward": forward, "generate": generate})


def install_bank(model: nn.Module, max_adapters: int, room: dict[str, int]) -> AdapterBank:
    """Put a bank's fused GEMMs in every sub-block, `room[space]` (a multiple of ALIGN) reserved for each
    rank space; returns the (empty) bank."""
    last = len(decoder_layers(model)) - 1
    for i, _, name, spec, holder in sub_blocks(model):
        ba_in_room = room[f"ba.{_PREVIOUS[name]}"] if (name == "mlp" or i > 0) else 0  # none arrives at layer 0
        ba_out_room = room[f"ba.{name}"] if (name == "attn" or i < last) else 0  # the last MLP has no successor
        fa_room = room[f"fa.{name}"]
        group = BankInputProjections([unwrap(getattr(holder, p)) for p in spec.inputs], name,
                                     extra_rows=fa_room, extra_cols=ba_in_room)
        output = BankOutputProjection(unwrap(getattr(holder, spec.output)), name, extra_rows=ba_out_room, extra_cols=fa_room)
        install_fused(holder, spec, group, output)
    return AdapterBank(model, max_adapters, room)


def build_bank(model: nn.Module, max_adapters: int, rank_budget: int) -> AdapterBank:
    """Fuse a plain base model with room for `max_adapters` adapters of total rank `rank_budget` per rank
    space (a multiple of ALIGN), and `adapter_names=` on its forward and generate; returns the (empty)
    bank. `fflora.fuse(model, max_adapters=K)` checks its arguments and the model first."""
    bank = install_bank(model, max_adapters, dict.fromkeys(SPACES, rank_budget))
    extend(model, _bank_model_class(type(model)))
    return bank


def unfuse_bank(model: nn.Module) -> None:
    """Drop the bank's GEMMs and class (its adapters with them): the plain base projections again."""
    restore(model)
    unfuse_plain(model)
