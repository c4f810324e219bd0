"""The memory `fflora serve` will hold, from the fused model and its settings, printed at start."""

from __future__ import annotations

from torch import nn

from ..models.footprint import tensor_bytes
from .config import SLOT_LEN_CAP, ServerConfig


def slot_length(model: nn.Module, cfg: ServerConfig) -> int:
    """Positions per KV slot: --max-model-len, or the model's (at most SLOT_LEN_CAP)."""
    return cfg.max_model_len or min(model.config.get_text_config().max_position_embeddings, SLOT_LEN_CAP)


def kv_cache_tokens(model: nn.Module, cfg: ServerConfig) -> tuple[int, str]:
    """(tokens the KV cache holds, the options that set it): every slot's positions."""
    length = slot_length(model, cfg)
    return cfg.max_num_seqs * length, f"{cfg.max_num_seqs} slots x {length} positions, --max-num-seqs x --max-model-len"


def memory_estimate(model: nn.Module, cfg: ServerConfig, runtime: int = 0, merged: list[nn.Module] = ()) -> dict[str, int]:
    """Bytes the server will hold, from the fused model and the settings: the weights (measured on the
    model and on the `merged` LoRA models, each with an engine, a KV cache and a step of its own), the
    KV slots, one engine step's largest temporaries (its logits, over every token of the step, and
    the MLP's activations), and `runtime` (what the process held before the model)."""
    weights = tensor_bytes(model) + sum(tensor_bytes(m) for m in merged)
    engines = 1 + len(merged)
    text = model.config.get_text_config()
    element = next(model.parameters()).element_size()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    kv_cache = kv_cache_tokens(model, cfg)[0] * text.num_hidden_layers * 2 * kv_heads * head_dim * element
    step = cfg.max_batch_tokens * (text.vocab_size * 4 + 3 * text.intermediate_size * element)  # fp32 logits
    kv_cache, step = engines * kv_cache, engines * step
    return {"runtime": runtime, "weights": weights, "kv_cache": kv_cache, "step": step,
            "total": runtime + weights + kv_cache + step}


def describe_memory(estimate: dict[str, int], cfg: ServerConfig, model: nn.Module) -> str:
    gb = {k: v / 1e9 for k, v in estimate.items()}
    return (f"memory: about {gb['total']:.2f} GB = runtime {gb['runtime']:.2f} + weights {gb['weights']:.2f} + KV cache "
            f"{gb['kv_cache']:.2f} ({kv_cache_tokens(model, cfg)[1]}) + one step's work {gb['step']:.2f} "
            f"({cfg.max_batch_tokens} tokens, --max-batch-tokens)")
