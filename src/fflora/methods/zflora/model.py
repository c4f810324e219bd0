"""Attach zFLoRA to a transformers causal LM (training form), take it off, name its parameters.

Called through `fflora.apply_adapter` / `fflora.remove_adapter` (`fflora.methods.adapters`), which
do the checks every method shares first.
"""

from __future__ import annotations

from torch import nn

from ...models.architectures import architecture_of, decoder_layers, sub_blocks
from ...utils.classes import extend, restore
from ..layers import require_linear
from .config import ZFLoRAConfig
from .layers import (ZHeadMerge, ZInputProjection, ZLayerAdapters, ZMergedHead, ZNorm, ZOutputProjection, ZSubBlockAdapter,
                     zflora_layer_class)

PARAMS = ("z_in", "z_out")
MERGE_KEY = "head.z_merge"


def check_zflora_architecture(model: nn.Module) -> None:
    """ValueError unless zFLoRA can carry its state through this model's residual stream."""
    arch = architecture_of(model)
    if arch.output_norms:
        raise ValueError(
            f"zFLoRA does not support model type {model.config.model_type!r} yet: its decoder layers normalise "
            "each sub-block's output before the residual add, which would also normalise the adapter state "
            "carried in the residual stream. Use FFBA (fflora.FFBAConfig) on this model."
        )


def attach_zflora(model: nn.Module, config: ZFLoRAConfig) -> None:
    """Add zFLoRA to `model` in place (training form); only adapter parameters train. Everything is
    built and validated before the model is touched."""
    check_zflora_architecture(model)
    arch = architecture_of(model)
    d = model.config.hidden_size
    adapters = {}
    for i, layer, name, spec, holder in sub_blocks(model):
        inputs = [require_linear(getattr(holder, p), f"{spec.module}.{p}") for p in spec.inputs]
        output = require_linear(getattr(holder, spec.output), f"{spec.module}.{spec.output}")
        if not hasattr(layer, spec.norm):
            raise ValueError(f"{type(layer).__name__} has no {spec.norm!r}; fflora.models.architectures names the wrong pre-norm")
        if name in config.sub_blocks:
            adapters[i, name] = ZSubBlockAdapter(
                name, input_widths=tuple(p.out_features for p in inputs), d_core=output.in_features, r=config.r,
                scale=config.scale, dropout=config.dropout, dtype=output.weight.dtype, device=output.weight.device,
                reads=bool(adapters),  # the first one reads a state nothing has written yet
            )
    ref = model.get_input_embeddings().weight
    merge = ZHeadMerge(model.get_submodule(arch.final_norm), d, config.r, config.scale, ref.dtype, ref.device)
    for param in model.parameters():
        param.requires_grad_(False)
    for i, layer in enumerate(decoder_layers(model)):
        layer.zflora = ZLayerAdapters(adapters.get((i, "attn")), adapters.get((i, "mlp")))
        layer.zflora_d, layer.zflora_state_width = d, config.r
        extend(layer, zflora_layer_class(type(layer)))
    for i, layer, name, spec, holder in sub_blocks(model):
        adapter = adapters.get((i, name))
        setattr(layer, spec.norm, ZNorm(getattr(layer, spec.norm), d, keep_state=adapter is not None))
        if adapter is not None:
            for index, p in enumerate(spec.inputs):
                setattr(holder, p, ZInputProjection(getattr(holder, p), adapter, index))
        setattr(holder, spec.output, ZOutputProjection(getattr(holder, spec.output), adapter, config.r))
    _replace_final_norm(model, merge)


def detach_zflora(model: nn.Module) -> None:
    """Take zFLoRA off a model in training form: the plain base model again."""
    arch = architecture_of(model)
    for _, layer, name, spec, holder in sub_blocks(model):
        for p in (*spec.inputs, spec.output):
            module = getattr(holder, p)
            setattr(holder, p, getattr(module, "base", module))
        setattr(layer, spec.norm, getattr(layer, spec.norm).norm)
    for layer in decoder_layers(model):
        del layer.zflora, layer.zflora_d, layer.zflora_state_width
        restore(layer)
    _replace_final_norm(model, model.get_submodule(arch.final_norm).norm)


def unload_fused_zflora(model: nn.Module) -> None:
    """Drop the adapter modules from a fused model: the fused GEMMs hold the sub-blocks' rows and columns,
    and the head merge keeps B_m as a fixed buffer (`ZMergedHead`)."""
    for layer in decoder_layers(model):
        layer.zflora.attn = layer.zflora.mlp = None
    merge = model.get_submodule(architecture_of(model).final_norm)
    _replace_final_norm(model, ZMergedHead(merge.norm, merge.d, merge.scale, merge.z_merge.detach()))


def _replace_final_norm(model: nn.Module, module: nn.Module) -> None:
    """Put `module` where the architecture keeps the final norm (the head merge, or the norm again)."""
    parent, _, attr = architecture_of(model).final_norm.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def unread_keys(model: nn.Module) -> set[str]:
    """Keys of the B_in that adapters saved by fflora 0.1.0 had on the first sub-block with zFLoRA: it read
    a state that is still zero there, so it never changed an output; loading such an adapter drops it."""
    return {f"layers.{i}.{adapter.name}.z_in" for i, layer in enumerate(decoder_layers(model))
            for adapter in (layer.zflora.attn, layer.zflora.mlp) if adapter is not None and not adapter.reads}


def zflora_adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The live parameters under canonical keys `layers.{i}.{attn|mlp}.{z_in|z_out}` and `head.z_merge`."""
    params = {}
    for i, layer in enumerate(decoder_layers(model)):
        for adapter in (layer.zflora.attn, layer.zflora.mlp):
            if adapter is not None:
                params.update({f"layers.{i}.{adapter.name}.{p}": getattr(adapter, p) for p in PARAMS
                               if getattr(adapter, p) is not None})
    params[MERGE_KEY] = model.get_submodule(architecture_of(model).final_norm).z_merge
    return params


def zflora_rank(model: nn.Module) -> int:
    """r of the zFLoRA adapter on `model` (the head merge's width)."""
    return model.get_submodule(architecture_of(model).final_norm).z_merge.shape[1]
