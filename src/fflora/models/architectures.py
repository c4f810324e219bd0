"""Model surgery as data: where each supported architecture keeps its sub-blocks' projections.

The adapter logic never looks at a model type; it asks this table which modules are the input
and output projections of the attention and MLP sub-blocks of each decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class SubBlockSpec:
    """One sub-block of a decoder layer: the module holding it, its input and output projections,
    and the pre-norm (an attribute of the decoder layer) that feeds its input projections."""

    module: str
    inputs: tuple[str, ...]
    output: str
    norm: str


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the decoder layers of a causal LM live, the two sub-blocks of each layer and the final norm.

    `output_norms`: the layer normalises each sub-block's output before the residual add (Gemma 3),
    so channels added to the residual stream would pass through that norm: zFLoRA refuses these.
    """

    layers: str
    attn: SubBlockSpec
    mlp: SubBlockSpec
    final_norm: str
    output_norms: bool = False

    def sub_block(self, name: str) -> SubBlockSpec:
        return {"attn": self.attn, "mlp": self.mlp}[name]


_ATTN = SubBlockSpec("self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj", "input_layernorm")
_LLAMA_LIKE = ArchitectureSpec(
    layers="model.layers",
    attn=_ATTN,
    mlp=SubBlockSpec("mlp", ("gate_proj", "up_proj"), "down_proj", "post_attention_layernorm"),
    final_norm="model.norm",
)

# model_type -> spec. Qwen2 has biases on q/k/v and Gemma 3 normalises q and k after projecting;
# both only touch what happens after the projections. Gemma 3 also normalises each sub-block's
# output (its post_attention_layernorm is such an output norm; the MLP's pre-norm is
# pre_feedforward_layernorm).
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma3_text": ArchitectureSpec(
        layers="model.layers",
        attn=_ATTN,
        mlp=SubBlockSpec("mlp", ("gate_proj", "up_proj"), "down_proj", "pre_feedforward_layernorm"),
        final_norm="model.norm",
        output_norms=True,
    ),
}


def architecture_of(model: nn.Module) -> ArchitectureSpec:
    """The spec for `model`, or a ValueError naming the model types fflora supports."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"fflora does not support model type {model_type!r}; supported model types are "
            f"{sorted(ARCHITECTURES)}. Add an entry to fflora.models.architectures.ARCHITECTURES if the "
            "model has Llama-style pre-norm attention and gated-MLP sub-blocks."
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(architecture_of(model).layers)


def sub_blocks(model: nn.Module):
    """Yield (layer_index, layer, name, spec, holder) for the attention and MLP of every decoder layer;
    `holder` is the module whose attributes are the sub-block's projections."""
    arch = architecture_of(model)
    for i, layer in enumerate(model.get_submodule(arch.layers)):
        for name in ("attn", "mlp"):
            spec = arch.sub_block(name)
            yield i, layer, name, spec, layer.get_submodule(spec.module)


def projection_dims(hf_config) -> dict[str, int]:
    """The widths that parameter budgets need, from a transformers config alone: d (hidden), d_q (all
    query heads), kv (all key or value heads), inter (the MLP's), layers."""
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    return {
        "d": hf_config.hidden_size,
        "d_q": heads * head_dim,
        "kv": kv_heads * head_dim,
        "inter": hf_config.intermediate_size,
        "layers": hf_config.num_hidden_layers,
    }
