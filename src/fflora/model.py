"""Attach FFBA or zFLoRA (`fflora.zflora`) adapters to a transformers causal LM, take them off, and
count what they cost."""

from __future__ import annotations

from torch import nn

from .adapter import SubBlockAdapter
from .models.architectures import architecture_of, decoder_layers, sub_blocks
from .config import FFBAConfig, ZFLoRAConfig
from .fused import unfuse
from .layers import AdaptedInputProjection, AdaptedOutputProjection, LayerAdapters, ffba_layer_class
from .zflora import is_zflora


def _require_linear(module: nn.Module, path: str) -> nn.Linear:
    if type(module) is not nn.Linear:
        raise ValueError(
            f"fflora adapts plain torch.nn.Linear projections, but {path} is a {type(module).__name__}; "
            "load the base model unquantized (e.g. dtype=torch.bfloat16) before applying FFBA"
        )
    return module


def sub_block_ranks(cfg: FFBAConfig, name: str, layer_index: int, num_layers: int) -> tuple[int, int, int]:
    """(fa_rank, ba_in_rank, ba_out_rank) of sub-block `name` ("attn"/"mlp") of layer `layer_index`.

    BA into attention comes from the previous layer's MLP (none in layer 0); BA out of the MLP
    needs a next layer (none in the last one). 0 means the sub-block has no such adapter.
    """
    ba_from = {s: cfg.backward and s in cfg.sub_blocks for s in ("attn", "mlp")}
    r_b = cfg.rank_backward
    fa = cfg.r if cfg.forward and name in cfg.sub_blocks else 0
    if name == "attn":
        return fa, r_b if ba_from["mlp"] and layer_index > 0 else 0, r_b if ba_from["attn"] else 0
    return fa, r_b if ba_from["attn"] else 0, r_b if ba_from["mlp"] and layer_index < num_layers - 1 else 0


def _sub_block_adapter(holder, block, name, cfg, ranks: tuple[int, int, int]) -> SubBlockAdapter | None:
    """The adapter of one sub-block (projections on `holder`), or None if nothing adapts it."""
    fa_rank, ba_in_rank, ba_out_rank = ranks
    if not (fa_rank or ba_in_rank or ba_out_rank):
        return None
    inputs = [_require_linear(getattr(holder, p), f"{block.module}.{p}") for p in block.inputs]
    output = _require_linear(getattr(holder, block.output), f"{block.module}.{block.output}")
    return SubBlockAdapter(
        name,
        d_in=inputs[0].in_features,
        d_core=output.in_features,
        input_widths=tuple(p.out_features for p in inputs),
        fa_rank=fa_rank,
        fa_scale=cfg.scale_forward,
        ba_out_rank=ba_out_rank,
        ba_in_rank=ba_in_rank,
        ba_scale=cfg.scale_backward,
        phi=cfg.phi,
        dropout=cfg.dropout,
        dtype=output.weight.dtype,
        device=output.weight.device,
    )


def apply_adapter(model: nn.Module, config: FFBAConfig | ZFLoRAConfig) -> nn.Module:
    """Add FFBA (`FFBAConfig`) or zFLoRA (`ZFLoRAConfig`) adapters to `model` in place (training
    form) and return it.

    Every base parameter is frozen; only adapter parameters are trainable. Raises ValueError for
    unsupported architectures, quantized projections, or a model that already has adapters; the
    model is left untouched when it does.
    """
    if not isinstance(config, (FFBAConfig, ZFLoRAConfig)):
        raise TypeError(f"apply_adapter expects an FFBAConfig or a ZFLoRAConfig, got {type(config).__name__}")
    config.validate()  # configurations are mutable (as PEFT's are): check what was set after construction
    architecture_of(model)
    if has_ffba(model):
        raise ValueError("this model already has adapters; load or apply them onto a fresh base model")
    if getattr(model, "ffba_fused", False):
        raise ValueError("this model is fused; call fflora.unfuse(model) before applying adapters")
    if isinstance(config, ZFLoRAConfig):
        from .zflora.model import apply_zflora

        return apply_zflora(model, config)
    return _apply_ffba(model, config)


apply_ffba = apply_adapter  # the name from before zFLoRA; both families


def _apply_ffba(model: nn.Module, config: FFBAConfig) -> nn.Module:
    num_layers = len(decoder_layers(model))
    adapters = {}  # built (and validated) before the model is touched
    for i, _, name, block, holder in sub_blocks(model):
        ranks = sub_block_ranks(config, name, i, num_layers)
        adapters[i, name] = _sub_block_adapter(holder, block, name, config, ranks)
    for param in model.parameters():
        param.requires_grad_(False)
    carried_in = 0
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = adapters[i, "attn"], adapters[i, "mlp"]
        layer.ffba = LayerAdapters(attn, mlp, carried_width=mlp.ba_out_rank if mlp is not None else 0)
        layer.ffba_carried_in_width, carried_in = carried_in, layer.ffba.carried_width
        layer.__class__ = ffba_layer_class(type(layer))
    for i, _, name, block, holder in sub_blocks(model):
        adapter = adapters[i, name]
        if adapter is not None:
            for index, p in enumerate(block.inputs):
                setattr(holder, p, AdaptedInputProjection(getattr(holder, p), adapter, index))
            setattr(holder, block.output, AdaptedOutputProjection(getattr(holder, block.output), adapter))
    model.ffba_config = config
    # Reentrant gradient checkpointing only tracks inputs that require grad; the embeddings are
    # frozen, so make their output require grad (as PEFT does) or adapter gradients would vanish.
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


def remove_adapter(model: nn.Module) -> nn.Module:
    """Take every FFBA or zFLoRA adapter off `model` (unfusing first if needed): the plain base model again."""
    if not has_ffba(model):
        return model
    unfuse(model)
    if is_zflora(model):
        from .zflora.model import remove_zflora

        remove_zflora(model)
        model.ffba_config = None
        return model
    for _, layer, name, block, holder in sub_blocks(model):
        if getattr(layer.ffba, name) is not None:
            for p in (*block.inputs, block.output):
                setattr(holder, p, getattr(holder, p).base)
    for layer in decoder_layers(model):
        del layer.ffba
        del layer.ffba_carried_in_width
        layer.__class__ = layer._fflora_base_class
    model.ffba_config = None
    return model


remove_ffba = remove_adapter


def has_ffba(model: nn.Module) -> bool:
    """Whether the model carries adapters of either family (FFBA or zFLoRA); `model.ffba_config` says which."""
    return getattr(model, "ffba_config", None) is not None


def sub_block_adapters(model: nn.Module):
    """Yield (layer_index, SubBlockAdapter) for every adapted sub-block of `model`."""
    for i, layer in enumerate(decoder_layers(model)):
        adapters = getattr(layer, "ffba", None)
        if adapters is None:
            continue
        for adapter in (adapters.attn, adapters.mlp):
            if adapter is not None:
                yield i, adapter


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
