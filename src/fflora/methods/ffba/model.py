"""Attach FFBA to a transformers causal LM (training form), take it off, name its parameters.

Called through `fflora.apply_adapter` / `fflora.remove_adapter` (`fflora.methods.adapters`), which
do the checks every method shares first.
"""

from __future__ import annotations

from torch import nn

from ...models.architectures import decoder_layers, sub_blocks
from ...utils.classes import extend, restore
from ..layers import require_linear
from .adapter import SubBlockAdapter
from .config import FFBAConfig
from .layers import AdaptedInputProjection, AdaptedOutputProjection, LayerAdapters, ffba_layer_class

PARAMS = ("fa_down", "fa_up", "ba_down", "ba_up")


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
    inputs = [require_linear(getattr(holder, p), f"{block.module}.{p}") for p in block.inputs]
    output = require_linear(getattr(holder, block.output), f"{block.module}.{block.output}")
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


def attach_ffba(model: nn.Module, config: FFBAConfig) -> None:
    """Add FFBA to `model` in place (training form); every adapter is built (and validated) before
    the model is touched."""
    num_layers = len(decoder_layers(model))
    adapters = {}
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
        extend(layer, ffba_layer_class(type(layer)))
    for i, _, name, block, holder in sub_blocks(model):
        adapter = adapters[i, name]
        if adapter is not None:
            for index, p in enumerate(block.inputs):
                setattr(holder, p, AdaptedInputProjection(getattr(holder, p), adapter, index))
            setattr(holder, block.output, AdaptedOutputProjection(getattr(holder, block.output), adapter))


def detach_ffba(model: nn.Module) -> None:
    """Take FFBA off a model in training form: the plain base model again."""
    for _, layer, name, block, holder in sub_blocks(model):
        if getattr(layer.ffba, name) is not None:
            for p in (*block.inputs, block.output):
                setattr(holder, p, getattr(holder, p).base)
    for layer in decoder_layers(model):
        del layer.ffba
        del layer.ffba_carried_in_width
        restore(layer)


def unload_fused_ffba(model: nn.Module) -> None:
    """Drop every sub-block's adapter module from a fused model: its fused GEMMs (a one-adapter bank,
    `ffba.fused`) hold the adapter's rows and columns."""
    for layer in decoder_layers(model):
        layer.ffba.attn = layer.ffba.mlp = None


def sub_block_adapters(model: nn.Module):
    """Yield (layer_index, SubBlockAdapter) for every adapted sub-block of `model`."""
    for i, layer in enumerate(decoder_layers(model)):
        adapters = getattr(layer, "ffba", None)
        if adapters is None:
            continue
        for adapter in (adapters.attn, adapters.mlp):
            if adapter is not None:
                yield i, adapter


def adapter_of(layer: nn.Module, name: str) -> SubBlockAdapter | None:
    """The FFBA adapter of sub-block `name` of a decoder layer (None: not adapted)."""
    return getattr(getattr(layer, "ffba", None), name, None)


def ffba_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The live parameters under canonical keys `layers.{i}.{attn|mlp}.{fa_down|fa_up|ba_down|ba_up}`."""
    params = {}
    for i, adapter in sub_block_adapters(model):
        for name in PARAMS:
            tensor = getattr(adapter, name)
            if tensor is not None:
                params[f"layers.{i}.{adapter.name}.{name}"] = tensor
    return params
