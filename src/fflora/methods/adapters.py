"""The operations every method shares on a model in training form: apply and remove an adapter, the
adapter's parameters, and parameter summaries (the fused form is `fused_model`).

Each checks what holds for every method, then hands the method-specific work to the model's `Method`
(`registry`); nothing here asks which method it holds.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..models.architectures import architecture_of
from . import registry
from .fused_state import fused_model_of


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
    if fused_model_of(model) is not None:
        raise ValueError("this model is fused; call fflora.unfuse(model) before applying adapters")
    method.apply(model, config)
    setattr(model, registry.ATTRIBUTE, config)
    # Reentrant gradient checkpointing only tracks inputs that require grad; the embeddings are
    # frozen, so make their output require grad (as PEFT does) or adapter gradients would vanish.
    embedding_grad_hook(model, on=True)
    return model


def remove_adapter(model: nn.Module) -> nn.Module:
    """Take every adapter off `model` (unfusing first if needed): the plain base model again."""
    method = registry.method_of(model)
    if method is None:
        return model
    fused = fused_model_of(model)
    if fused is not None:
        fused.unfuse()
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


def embedding_grad_hook(model: nn.Module, on: bool) -> None:
    """Switch the hook that makes the embeddings' output require grad (`apply_adapter` sets it for
    reentrant gradient checkpointing; `FusedModel` switches it). The fused form is for inference, and the hook's in-place
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
