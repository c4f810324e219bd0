"""Parameter budgets from a model config alone: the FFBA and zFLoRA formulas of the design and LoRA's."""

from __future__ import annotations

from ..config import FFBAConfig, ZFLoRAConfig

# The seven projections of a Llama-family decoder layer: LoRA's targets in every comparison.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _dims(hf_config) -> dict[str, int]:
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


def ffba_parameter_count(hf_config, cfg: FFBAConfig) -> int:
    """Trainable parameters of FFBA on a Llama-family model, per the design's per-layer formula.

    Per layer: FA attn 2*d*r, FA mlp 2*d*r, BA attn->mlp d_attn*r + 2*inter*r; and for each of the
    layers-1 layers that have a successor, BA mlp->next attn inter*r + (d_q + 2*kv)*r.
    """
    k = _dims(hf_config)
    r_f, r_b = cfg.r, cfg.rank_backward
    per_layer = 0
    if cfg.forward:
        per_layer += sum(2 * k["d"] * r_f for s in ("attn", "mlp") if s in cfg.sub_blocks)
    if cfg.backward and "attn" in cfg.sub_blocks:
        per_layer += k["d_q"] * r_b + 2 * k["inter"] * r_b
    crossing = 0
    if cfg.backward and "mlp" in cfg.sub_blocks:
        crossing = k["inter"] * r_b + (k["d_q"] + 2 * k["kv"]) * r_b
    return k["layers"] * per_layer + (k["layers"] - 1) * crossing


def zflora_parameter_count(hf_config, cfg: ZFLoRAConfig) -> int:
    """Trainable parameters of zFLoRA (shared/design/zflora.md): per layer, attention (d_q + 2*kv)*r
    (B_in) + d_q*r (A_out) and MLP 2*inter*r + inter*r, for the sub-blocks that carry it; plus d*r (B_m);
    less the B_in of the first such sub-block, which would read a state nothing has written yet."""
    k = _dims(hf_config)
    reads = {"attn": (k["d_q"] + 2 * k["kv"]) * cfg.r, "mlp": 2 * k["inter"] * cfg.r}
    writes = {"attn": k["d_q"] * cfg.r, "mlp": k["inter"] * cfg.r}
    first = next(s for s in ("attn", "mlp") if s in cfg.sub_blocks)
    per_layer = sum(reads[s] + writes[s] for s in cfg.sub_blocks)
    return k["layers"] * per_layer + k["d"] * cfg.r - reads[first]


def adapter_parameter_count(hf_config, cfg: FFBAConfig | ZFLoRAConfig) -> int:
    """The formula of the configuration's family."""
    if isinstance(cfg, ZFLoRAConfig):
        return zflora_parameter_count(hf_config, cfg)
    return ffba_parameter_count(hf_config, cfg)


def lora_parameter_count(hf_config, r: int) -> int:
    """Trainable parameters of LoRA at rank r on all seven projections (r * (in + out) each)."""
    k = _dims(hf_config)
    d, d_q, kv, inter = k["d"], k["d_q"], k["kv"], k["inter"]
    per_layer = (d + d_q) + 2 * (d + kv) + (d_q + d) + 2 * (d + inter) + (inter + d)
    return k["layers"] * per_layer * r


def _closest_rank(count, target: int) -> int:
    """The smallest rank whose parameter count is closest to target (counts grow with the rank)."""
    r = 1
    while count(r) < target:
        r += 1
    return min((max(1, r - 1), r), key=lambda k: (abs(count(k) - target), k))


def match_ffba_rank(hf_config, lora_r: int, family: type = FFBAConfig, **kwargs) -> int:
    """The FFBA (or, with family=ZFLoRAConfig, zFLoRA) rank whose trainable-parameter count is
    closest to LoRA's at rank `lora_r`."""
    target = lora_parameter_count(hf_config, lora_r)
    return _closest_rank(lambda r: adapter_parameter_count(hf_config, family(r=r, **kwargs)), target)


def match_lora_rank(hf_config, adapter: FFBAConfig | ZFLoRAConfig) -> int:
    """The LoRA rank whose trainable-parameter count is closest to this adapter configuration's."""
    target = adapter_parameter_count(hf_config, adapter)
    return _closest_rank(lambda r: lora_parameter_count(hf_config, r), target)
