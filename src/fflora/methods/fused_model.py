"""`FusedModel`: the one inference form of a model, built once, holding everything fused in one object.

    fused = FusedModel.build(model, weights="int8", max_adapters=8)   # or fflora.fuse(model, ...)
    fused.load("support", "runs/support")                              # into the adapter bank
    fused.plan(); fused.compile()                                      # the decode fast path
    fused.generate(input_ids, adapter_names=["support", BASE_NAME])
    model = fused.unfuse()                                             # exact: the training form again

It is built from a base model (plain, or carrying one adapter in training form: that adapter fused
in; with `max_adapters` it joins the bank as "default") and owns, from then on, what fusing made: the
fused GEMMs, the weight format, the adapter bank, the GEMM plan and the compiled-step settings. The
model is fused in place and keeps working as a transformers model (`fused.model`, `fused.model.generate`);
it carries its `FusedModel` (`FusedModel.of(model)`), so the functional API (`fflora.fuse`,
`fflora.plan_gemms`, `fflora.compile_decode`, `fflora.unfuse`, `fflora.load_adapter(..., adapter_name=)`)
is these methods by another name. Which method is fused is the `Method`'s business (`method.fuse`,
`method.build_bank`); nothing here asks which one it holds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
from torch import nn

from ..fastpath.compile import compile_generation, drop_compiled_step
from ..fastpath.plan import plan_modules, planned_modules
from ..ops.formats import check_weights
from ..ops.gemm import set_gemm_plan
from . import registry
from .adapter_files import adapter_folder, config_of, read_adapter_config, read_checked
from .adapters import adapter_parameters, adapter_state_dict, apply_adapter, embedding_grad_hook, remove_adapter
from .fused import ALIGN, fuse_plain, gemm_modules, unfuse_plain
from .fused_state import attach, fused_model_of
from .interface import Method
from .weight_formats import convert, restore

DEFAULT_MAX_ADAPTERS = 8  # of a bank made by fflora.load_adapter(model, path, adapter_name=...)
DEFAULT_RANK_PER_ADAPTER = 16  # default rank budget per rank space: max_adapters * this
NO_BANK = ("this model has no adapter bank; create one with fflora.fuse(model, max_adapters=K) "
           "or load an adapter with fflora.load_adapter(model, path, adapter_name=...)")


class FusedModel:
    """A model in the fused inference form and everything that form holds (see the module docstring).

    model: the transformers model, fused in place; method: the `Method` whose fused form is installed
    (None: the plain base, fused); bank: the method's adapter bank (None: one adapter or none); gemms:
    every fused GEMM module; weights: their format; dtype: the model's dtype before fusing; fingerprint:
    the base weights' fingerprint from before quantizing (None: computed from the weights); gemm_mode
    and planned: the GEMM plan (`plan`) and the modules it changed; compiled: the generation settings
    from before `compile` (None: not compiled); fused_form: what the method's single-adapter fused form
    keeps to refresh it (`Method.fuse`; FFBA: a one-adapter bank, not for loading into)."""

    def __init__(self, model: nn.Module, method: Method | None, bank=None, fused_form=None) -> None:
        """Record a model that `build` just fused; use `build`, which fuses."""
        self.model, self.method, self.bank, self.fused_form = model, method, bank, fused_form
        self.gemms = gemm_modules(model)
        self.weights, self.dtype, self.fingerprint = "float32", torch.float32, None
        self.gemm_mode, self.planned = "standard", []
        self.compiled: tuple | None = None

    # --- building and taking apart ---

    @staticmethod
    def of(model: nn.Module) -> FusedModel | None:
        """The `FusedModel` a fused model carries, or None if it is not fused."""
        return fused_model_of(model)

    @classmethod
    def build(cls, model: nn.Module, weights: str | None = None, max_adapters: int | None = None,
              rank_budget: int | None = None) -> FusedModel:
        """Fuse `model` in place and return its `FusedModel` (a model fused already: its own, if the
        arguments agree with how it was fused).

        `weights`: "float32", "bfloat16", "int8" or "int4" (`weight_formats`); None keeps the model's
        dtype. `max_adapters=K` reserves room for an adapter bank of up to K adapters, of total rank
        `rank_budget` per rank space (default 16 * K, rounded up to a multiple of 8). A format or bank the
        model cannot take is a ValueError that leaves the model as it was.
        """
        check_weights(weights)
        fused = cls.of(model)
        if fused is not None:
            fused._check_same(weights, max_adapters, rank_budget)
            return fused
        if max_adapters is not None:
            return cls._build_bank(model, max_adapters, rank_budget, weights)
        method = registry.method_of(model)
        embedding_grad_hook(model, on=False)
        fused_form = fuse_plain(model) if method is None else method.fuse(model, registry.adapter_config(model))
        fused = cls(model, method, fused_form=fused_form)
        attach(model, fused)
        fused._convert(weights, keep=set(map(id, adapter_parameters(model).values())))
        return fused

    @staticmethod
    def room_for(paths: Sequence[str | os.PathLike]) -> int:
        """The rank budget that holds the adapters at `paths` (adapter or run folders) in one bank: the largest,
        over the bank's rank spaces, of their ranks' sum, read from their configurations alone, rounded up to
        a multiple of 8 as a bank's budget is (8 for no adapter).
        What `build(max_adapters=len(paths), rank_budget=...)` takes for a bank of fixed adapters: a bank's
        whole room is in every GEMM a step runs, so room no adapter uses costs time (8 adapters of rank 8 in
        the default room of 16 each: 25.1 ms a compiled 8-row step of SmolLM2 in bfloat16, against 23.5 in a
        room of 64). Adapters of a method the bank does not hold count nothing (loading them says why)."""
        bank_method, totals = registry.bank_method(), {}
        for path in paths:
            method, config = config_of(read_adapter_config(adapter_folder(path)))
            if method is bank_method:
                for space, rank in bank_method.bank_ranks(config).items():
                    totals[space] = totals.get(space, 0) + rank
        return _whole_blocks(max([1, *totals.values()]))

    @classmethod
    def _build_bank(cls, model: nn.Module, max_adapters: int, rank_budget: int | None, weights: str | None) -> FusedModel:
        budget = _bank_budget(max_adapters, rank_budget)
        bank_method, carried_method = registry.bank_method(), registry.method_of(model)
        if carried_method is not None and carried_method is not bank_method:
            raise ValueError(f"{carried_method.title} adapters cannot join an adapter bank (it holds {bank_method.title} "
                             "adapters); fuse this model without max_adapters")
        carried = (registry.adapter_config(model), adapter_state_dict(model)) if carried_method is not None else None
        remove_adapter(model)
        fused = cls(model, bank_method, bank_method.build_bank(model, max_adapters, budget))
        attach(model, fused)
        try:
            fused._convert(weights, keep=set())
        except ValueError:
            if carried is not None:  # the model as it came: its adapter back on, in training form
                apply_adapter(model, carried[0])
                with torch.no_grad():
                    for key, param in adapter_parameters(model).items():
                        param.copy_(carried[1][key])
            raise
        if carried is not None:
            fused.bank.add("default", *carried)
        return fused

    def _check_same(self, weights: str | None, max_adapters: int | None, rank_budget: int | None) -> None:
        """A ValueError, naming the fix, when `build` asks an already fused model for another form."""
        if weights is not None and weights != self.weights:
            raise ValueError(f"this model is fused with {self.weights} weights; call fflora.unfuse(model) before "
                             f"fusing it with {weights} weights")
        if max_adapters is None:
            return
        if self.bank is None:
            raise ValueError("this model is fused with a single adapter; call fflora.unfuse(model) before fusing it with a bank")
        budget = _bank_budget(max_adapters, rank_budget)
        if self.bank.max_adapters != max_adapters or (rank_budget is not None and self.bank.rank_budget != budget):
            raise ValueError(f"this model already has an adapter bank ({self.bank.max_adapters} adapters, rank budget "
                             f"{self.bank.rank_budget}); unfuse it first to change its size")

    def _convert(self, weights: str | None, keep: set[int]) -> None:
        """The fused weights in format `weights`; a format the model cannot take leaves it unfused again."""
        try:
            convert(self.model, self, weights, keep)
        except ValueError:
            self.unfuse()
            raise

    def unfuse(self) -> nn.Module:
        """The model back in training form (or the plain base), in place, bit for bit; returns it. A bank's
        adapters (copies of what was loaded) are dropped with it, and this object holds nothing fused
        any more (a second call returns the model as it is)."""
        model = self.model
        if FusedModel.of(model) is not self:
            return model
        self._undo_fast_path()
        restore(model, self, keep=set(map(id, adapter_parameters(model).values())))
        if self.bank is not None:
            self.method.unfuse_bank(model)
        elif self.method is None:
            unfuse_plain(model)
        else:
            self.method.unfuse(model)
            if registry.adapter_config(model) is None:  # merged and unloaded (`drop_training_form`): the base
                self.method.remove(model)
        attach(model, None)
        self.bank, self.fused_form, self.gemms = None, None, []
        if registry.adapter_config(model) is not None:  # the adapter trains again
            embedding_grad_hook(model, on=True)
        return model

    # --- adapters ---

    def load(self, name: str, path: str | os.PathLike, strict: bool = False) -> None:
        """Load the adapter at `path` (an adapter folder or a `fflora train` run folder) into the bank as
        `name`: only its rows and columns are written. ValueError (the bank unchanged) for a name in use,
        a full bank, an adapter of another method or shape, or corrupt files; a base-weights mismatch
        warns, or raises if `strict`."""
        bank = self._require_bank()
        bank.check_new_name(name)  # before reading any file
        path = adapter_folder(path)
        config, weights = read_checked(self.model, path, strict)
        method = registry.for_config(config)
        if method is not self.method:
            raise ValueError(f"the adapter at {path} is a {method.title} adapter; an adapter bank holds {self.method.title} "
                             "adapters only. Load it without adapter_name")
        bank.add(name, config, weights, source=str(path))

    def add(self, name: str, config, state: dict[str, torch.Tensor]) -> None:
        """Put an adapter given as its configuration and state dict (canonical keys) into the bank as `name`."""
        self._require_bank().add(name, config, state)

    def unload(self, name: str) -> None:
        """Take adapter `name` out of the bank (its rows and columns zeroed in place)."""
        self._require_bank().delete(name)

    def names(self) -> list[str]:
        """The adapters resident in the bank, in load order ([] without a bank)."""
        return [] if self.bank is None else self.bank.names()

    def drop_training_form(self) -> nn.Module:
        """PEFT's merge_and_unload: the fused adapter stays in the GEMMs, its training-form modules (PEFT's
        tuner layers) and parameters leave the model, which no longer carries an adapter (nothing to save
        or train; unfusing gives the plain base model). Returns the model."""
        if self.bank is not None or self.method is None:
            raise ValueError("drop_training_form takes a single fused adapter's modules out; this model has "
                             + ("an adapter bank" if self.bank is not None else "no adapter"))
        if registry.adapter_config(self.model) is not None:
            self.method.unload_fused(self.model)
            setattr(self.model, registry.ATTRIBUTE, None)
        return self.model

    def refresh(self) -> None:
        """After the parameters of the adapter fused in (not a bank's) changed, rewrite its rows and columns
        (nothing to do once `drop_training_form` took them out)."""
        if self.method is not None and self.bank is None and registry.adapter_config(self.model) is not None:
            self.method.refresh_fused(self.model, self.fused_form)

    def _require_bank(self):
        if self.bank is None:
            raise ValueError(NO_BANK)
        return self.bank

    # --- the decode fast path ---

    def plan(self, mode: str = "auto", rows: tuple[int, ...] = (1, 8)) -> dict:
        """Choose how every fused GEMM and the LM head run (`fflora.fastpath.plan`); returns its report.
        A compiled step is dropped (it is traced again, for the new layouts, when next needed)."""
        modules = planned_modules(self.model, [g.storage for g in self.gemms])
        report = plan_modules(modules, mode, rows)
        self.gemm_mode, self.planned = mode, [] if mode == "standard" else modules
        drop_compiled_step(self.model)
        return report

    def compile(self, freezing: bool = False, cpp_wrapper: bool = False) -> FusedModel:
        """Make `generate` run each decode step as one compiled graph (`fflora.fastpath.compile`); with a
        bank, its GEMMs then cover their whole room and masks choose each row's adapter. `freezing` and
        `cpp_wrapper`: inductor's options (see `fflora.compile_decode`)."""
        if self.bank is not None:
            self.bank.fix_windows()  # one graph for every mix of adapters (methods/ffba/bank.py)
        config = self.model.generation_config
        if self.compiled is None:  # the settings to restore on unfuse
            self.compiled = (config.cache_implementation, config.compile_config)
        compile_generation(self.model, freezing, cpp_wrapper)
        return self

    def _undo_fast_path(self) -> None:
        """The model's own generation settings again and every GEMM standard (F.linear, row-major)."""
        if self.compiled is not None:
            config = self.model.generation_config
            config.cache_implementation, config.compile_config = self.compiled
            self.compiled = None
        for module in self.planned:
            set_gemm_plan(module, None)
        self.planned, self.gemm_mode = [], "standard"
        drop_compiled_step(self.model)

    # --- running ---

    def __call__(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """The model's forward; `adapter_names`: one bank adapter (or `BASE_NAME`) per batch row."""
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self._require_bank().selected(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """The model's `generate`; `adapter_names` as for a call, one selection for every step."""
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self._require_bank().selected(adapter_names):
            return self.model.generate(*args, **kwargs)

    def __repr__(self) -> str:
        what = "base" if self.method is None else self.method.title + (f" bank {self.names()}" if self.bank else "")
        return f"FusedModel({type(self.model).__name__}, {what}, {self.weights}, gemms {self.gemm_mode})"


def _bank_budget(max_adapters: int, rank_budget: int | None) -> int:
    """The bank's rank budget per rank space (a multiple of ALIGN), after checking both arguments."""
    if isinstance(max_adapters, bool) or not isinstance(max_adapters, int) or max_adapters < 1:
        raise ValueError(f"max_adapters must be an integer >= 1, got {max_adapters!r}")
    budget = DEFAULT_RANK_PER_ADAPTER * max_adapters if rank_budget is None else rank_budget
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"rank_budget must be an integer >= 1, got {rank_budget!r}")
    return _whole_blocks(budget)


def _whole_blocks(rank: int) -> int:
    """`rank` rounded up to a multiple of ALIGN, as a bank's budget is."""
    return -(-rank // ALIGN) * ALIGN


def _required(model: nn.Module, message: str) -> FusedModel:
    fused = FusedModel.of(model)
    if fused is None:
        raise ValueError(message)
    return fused


# The functional API: each a `FusedModel` method, on the model that carries it.

def fuse(model: nn.Module, max_adapters: int | None = None, rank_budget: int | None = None,
         weights: str | None = None) -> nn.Module:
    """Switch `model` to the fused inference form, in place; returns it (`FusedModel.build`; the
    `FusedModel` is `FusedModel.of(model)`).

    Works with or without adapters (without: the fused base model, the latency lower bound). The fused
    form is for inference: adapter parameters receive no gradient through it. With `max_adapters=K` the
    fused GEMMs reserve room for an adapter bank of up to K adapters (`rank_budget`: their total rank per
    rank space, default 16 * K), loaded with `fflora.load_adapter(model, path, adapter_name=...)` and
    chosen per batch row with `adapter_names=`; a model carrying one adapter is fused with it resident as
    "default". `weights`: "float32", "bfloat16", "int8" or "int4"; None keeps the model's dtype.
    """
    return FusedModel.build(model, weights=weights, max_adapters=max_adapters, rank_budget=rank_budget).model


def unfuse(model: nn.Module) -> nn.Module:
    """Switch a fused model back to the training form (or the plain base), in place; returns it (a model
    not fused is returned as it is). A bank's adapters are dropped with it."""
    fused = FusedModel.of(model)
    return model if fused is None else fused.unfuse()


def plan_gemms(model: nn.Module, mode: str = "auto", rows: tuple[int, ...] = (1, 8)) -> dict:
    """Set how every GEMM of a fused model runs (`FusedModel.plan`; `fflora.fastpath.plan`); returns a report.

    mode "standard": row-major weights, F.linear (what `fflora.fuse` gives); "transposed": column-major
    weights, F.linear; "packed": a oneDNN-packed copy of each weight beside it; "auto": measured per
    weight shape at `rows` input rows (the decode batch sizes).
    """
    return _required(model, "GEMM plans are part of the fused form; call fflora.fuse(model) first").plan(mode, rows)


def compile_decode(model: nn.Module, freezing: bool = False, cpp_wrapper: bool = False) -> nn.Module:
    """Make `model.generate` (greedy or sampling) run each decode step as one compiled graph, in place;
    returns the model (`FusedModel.compile`). `model` must be fused, with one adapter, none, or a bank
    (`generate(..., adapter_names=)` or a `select_adapters` block around `generate` choose its rows).

    `freezing=True` turns on inductor's freezing pass. The graph still reads the weights at run time
    (they are inputs of the traced graph; a test loads new adapter weights into a compiled model, frozen
    or not, and checks the tokens follow them); on SmolLM2 here it was no faster than without it.

    `cpp_wrapper=True` has inductor call the graph's kernels from generated C++ instead of Python, which
    cuts the per-step overhead that dominates small models on a CPU: on SmolLM2 here, int4 base 8.5 ->
    7.5 ms per token and FFBA int4 9.5 -> 9.0 ms, at 80-270 s of compile time (C++ builds) instead of
    9-12 s; off by default for that cost.
    """
    message = "compile_decode needs a fused model: call fflora.fuse(model) first (the training form is not compiled)"
    _required(model, message).compile(freezing, cpp_wrapper)
    return model


def refresh_fused_weights(model: nn.Module) -> None:
    """After adapter parameters changed in a fused model, rewrite their fused rows/columns in place
    (nothing to do for a model in training form)."""
    fused = FusedModel.of(model)
    if fused is not None:
        fused.refresh()


def bank_of(model: nn.Module):
    """The model's adapter bank; a ValueError saying how to make one if it has none."""
    fused = FusedModel.of(model)
    if fused is None:
        raise ValueError(NO_BANK)
    return fused._require_bank()


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Unload `adapter_name` from the model's adapter bank (`FusedModel.unload`)."""
    bank_of(model).delete(adapter_name)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters resident in the model's bank, in load order ([] without a bank)."""
    fused = FusedModel.of(model)
    return [] if fused is None else fused.names()


@contextlib.contextmanager
def select_adapters(model: nn.Module, adapter_names: Sequence[str], lengths: Sequence[int] | None = None,
                    rearrange: bool = True):
    """Use `adapter_names` for the forward passes inside the block: one bank adapter (or `BASE_NAME`) per
    batch row, or per request of a packed batch with `lengths` (`AdapterBank.selected`).
    `model(..., adapter_names=...)` and `FusedModel.generate(..., adapter_names=...)` do the same."""
    with bank_of(model).selected(adapter_names, lengths=lengths, rearrange=rearrange):
        yield
