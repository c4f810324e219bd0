"""The operations every method shares, on any model: apply and remove an adapter, fuse and unfuse,
the adapter's parameters, and parameter summaries.

Each checks what holds for every method, then hands the method-specific work to the model's `Method`
(`registry`); nothing here asks which method it holds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.architectures import architecture_of
from ..ops.formats import check_weights
from . import registry
from .fused import ALIGN, fuse_plain, gemm_modules, unfuse_plain
from .fused_state import FusedState, attach, fused_state
from .weight_formats import convert, restore

DEFAULT_MAX_ADAPTERS = 8  # of a bank made by fflora.load_adapter(model, path, adapter_name=...)
DEFAULT_RANK_PER_ADAPTER = 16  # default rank budget per rank space: max_adapters * this


def apply_adapter(model: nn.Module, config) -> nn.Module:
    """Add FFBA (`FFBAConfig`) or zFLoRA (`ZFLoRAConfig`) adapters to `model` in place (training
    form) and return it.

    Every base parameter is frozen; only adapter parameters are trainable. Raises ValueError for
    unsupported architectures, quantized projections, or a model that already has adapters; the
    model is left untouched when it does.
    """
    method = registry.for_config(config, caller="apply_adapter")
    config.validate()  # configurations are mutable (as PEFT's are): check what was set after construction
    architecture_of(model)
    if has_adapter(model):
        raise ValueError("this model already has adapters; load or apply them onto a fresh base model")
    if fused_state(model) is not None:
        raise ValueError("this model is fused; call fflora.unfuse(model) before applying adapters")
    method.apply(model, config)
    setattr(model, registry.ATTRIBUTE, config)
    # Reentrant gradient checkpointing only tracks inputs that require grad; the embeddings are
    # frozen, so make their output require grad (as PEFT does) or adapter gradients would vanish.
    _embedding_grad_hook(model, on=True)
    return model


def remove_adapter(model: nn.Module) -> nn.Module:
    """Take every adapter off `model` (unfusing first if needed): the plain base model again."""
    method = registry.method_of(model)
    if method is None:
        return model
    unfuse(model)
    method.remove(model)
    setattr(model, registry.ATTRIBUTE, None)
    return model


apply_ffba = apply_adapter  # the names from before zFLoRA; every method
remove_ffba = remove_adapter


def has_adapter(model: nn.Module) -> bool:
    """Whether the model carries an adapter of any method (`fflora.methods.registry.adapter_config` says which)."""
    return registry.adapter_config(model) is not None


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The live adapter parameters under canonical keys: `layers.{i}.{attn|mlp}.{fa_down|fa_up|ba_down|ba_up}`
    for FFBA, `layers.{i}.{attn|mlp}.{z_in|z_out}` and `head.z_merge` for zFLoRA; {} without an adapter."""
    method = registry.method_of(model)
    return {} if method is None else method.parameters(model)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of the adapter parameters, under their canonical keys."""
    return {k: v.detach().contiguous().cpu() for k, v in adapter_parameters(model).items()}


def fuse(model: nn.Module, max_adapters: int | None = None, rank_budget: int | None = None,
         weights: str | None = None) -> nn.Module:
    """Switch `model` to the fused inference form, in place; returns it.

    Works with or without adapters (without: the fused base model, the latency lower bound).
    The fused form is for inference: adapter parameters receive no gradient through it.

    With `max_adapters=K` the fused GEMMs reserve room for an adapter bank of up to K adapters
    (`rank_budget`: their total rank per rank space, default 16 * K, rounded up to a multiple of 8),
    loaded with `fflora.load_adapter(model, path, adapter_name=...)` and chosen per batch row with
    `adapter_names=` (see `fflora.methods.ffba.bank`). A model carrying one adapter in training form
    is fused with that adapter resident as "default".

    `weights` puts the fused weights in another format: "float32", "bfloat16", "int8" or "int4" (see
    `fflora.methods.weight_formats`); None keeps the model's dtype. A format the model cannot take is
    a ValueError that leaves the model as it was.
    """
    check_weights(weights)
    state = fused_state(model)
    if state is not None and weights is not None and weights != state.weights:
        raise ValueError(f"this model is fused with {state.weights} weights; call fflora.unfuse(model) before "
                         f"fusing it with {weights} weights")
    if max_adapters is not None:
        return _fuse_with_bank(model, max_adapters, rank_budget, weights)
    if state is not None:
        return model
    method = registry.method_of(model)
    _embedding_grad_hook(model, on=False)
    if method is None:
        fuse_plain(model)
    else:
        method.fuse(model)
    state = FusedState(method=method, gemms=gemm_modules(model))
    attach(model, state)
    _convert_or_unfuse(model, state, weights, keep=set(map(id, adapter_parameters(model).values())))
    return model


def _fuse_with_bank(model: nn.Module, max_adapters: int, rank_budget: int | None, weights: str | None) -> nn.Module:
    if isinstance(max_adapters, bool) or not isinstance(max_adapters, int) or max_adapters < 1:
        raise ValueError(f"max_adapters must be an integer >= 1, got {max_adapters!r}")
    budget = DEFAULT_RANK_PER_ADAPTER * max_adapters if rank_budget is None else rank_budget
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"rank_budget must be an integer >= 1, got {rank_budget!r}")
    budget = -(-budget // ALIGN) * ALIGN
    state = fused_state(model)
    if state is not None and state.bank is not None:
        bank = state.bank
        if bank.max_adapters != max_adapters or (rank_budget is not None and bank.rank_budget != budget):
            raise ValueError(f"this model already has an adapter bank ({bank.max_adapters} adapters, rank budget "
                             f"{bank.rank_budget}); unfuse it first to change its size")
        return model
    bank_method, carried_method = registry.bank_method(), registry.method_of(model)
    if carried_method is not None and carried_method is not bank_method:
        raise ValueError(f"{carried_method.title} adapters cannot join an adapter bank (it holds {bank_method.title} "
                         "adapters); fuse this model without max_adapters")
    if state is not None:
        raise ValueError("this model is fused with a single adapter; call fflora.unfuse(model) before fusing it with a bank")
    carried = (registry.adapter_config(model), adapter_state_dict(model)) if carried_method is not None else None
    remove_adapter(model)
    bank = bank_method.build_bank(model, max_adapters, budget)
    state = FusedState(method=bank_method, bank=bank, gemms=gemm_modules(model))
    attach(model, state)
    try:
        _convert_or_unfuse(model, state, weights, keep=set())
    except ValueError:
        if carried is not None:  # the model as it came: its adapter back on, in training form
            apply_adapter(model, carried[0])
            with torch.no_grad():
                for key, param in adapter_parameters(model).items():
                    param.copy_(carried[1][key])
        raise
    if carried is not None:
        bank.add("default", *carried)
    return model


def _convert_or_unfuse(model: nn.Module, state: FusedState, weights: str | None, keep: set[int]) -> None:
    """The fused weights in format `weights`; a format the model cannot take leaves it unfused again."""
    try:
        convert(model, state, weights, keep)
    except ValueError:
        unfuse(model)
        raise


def unfuse(model: nn.Module) -> nn.Module:
    """Switch a fused model back to the training form (or the plain base), in place; returns it.

    A model fused with an adapter bank becomes the plain base model: the bank and its adapters
    (copies of what was loaded from disk) are dropped.
    """
    state = fused_state(model)
    if state is None:
        return model
    state.undo_fast_path(model)
    restore(model, state, keep=set(map(id, adapter_parameters(model).values())))
    if state.bank is not None:
        state.method.unfuse_bank(model)
    elif state.method is None:
        unfuse_plain(model)
    else:
        state.method.unfuse(model)
    attach(model, None)
    if has_adapter(model):  # the adapter trains again
        _embedding_grad_hook(model, on=True)
    return model


def refresh_fused_weights(model: nn.Module) -> None:
    """After adapter parameters changed in a fused model, rewrite their fused rows/columns in place
    (nothing to do for a model in training form)."""
    state = fused_state(model)
    if state is not None and state.method is not None and state.bank is None:
        state.method.refresh_fused(model)


def _embedding_grad_hook(model: nn.Module, on: bool) -> None:
    """Switch the hook that makes the embeddings' output require grad (`apply_adapter` sets it for
    reentrant gradient checkpointing). The fused form is for inference, and the hook's in-place
    `requires_grad_` would split a `torch.compile` graph in two, so it is off while fused."""
    if on and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif not on and hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def parameter_summary(model: nn.Module) -> dict:
    """Trainable and total parameter counts, as PEFT's print_trainable_parameters reports them."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total if total else 0.0}


def print_trainable_parameters(model: nn.Module) -> None:
    s = parameter_summary(model)
    print(f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || trainable%: {s['percent']:.4f}")
