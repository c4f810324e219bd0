"""Parameter budgets from a model config alone: each method's formula (its `Method.parameter_count`) next
to LoRA's, and the ranks that match them."""

from __future__ import annotations

from ..methods import registry
from ..models.architectures import projection_dims
from ..utils.method_names import DEFAULT_METHOD

# The seven projections of a Llama-family decoder layer: LoRA's targets in every comparison.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapter_parameter_count(hf_config, cfg) -> int:
    """Trainable parameters of the adapter `cfg` describes (its method's formula)."""
    return registry.for_config(cfg).parameter_count(hf_config, cfg)


def lora_parameter_count(hf_config, r: int) -> int:
    """Trainable parameters of LoRA at rank r on all seven projections (r * (in + out) each)."""
    k = projection_dims(hf_config)
    d, d_q, kv, inter = k["d"], k["d_q"], k["kv"], k["inter"]
    per_layer = (d + d_q) + 2 * (d + kv) + (d_q + d) + 2 * (d + inter) + (inter + d)
    return k["layers"] * per_layer * r


def _closest_rank(count, target: int) -> int:
    """The smallest rank whose parameter count is closest to target (counts grow with the rank)."""
    r = 1
    while count(r) < target:
        r += 1
    return min((max(1, r - 1), r), key=lambda k: (abs(count(k) - target), k))


def match_adapter_rank(hf_config, lora_r: int, method: str = DEFAULT_METHOD, **options) -> int:
    """The rank of method `method` ("ffba", "zflora"; with `options` for the rest of its configuration)
    whose trainable-parameter count is closest to LoRA's at rank `lora_r`."""
    target = lora_parameter_count(hf_config, lora_r)
    return _closest_rank(lambda r: adapter_parameter_count(hf_config, registry.make_config(method, r=r, **options)), target)


def match_lora_rank(hf_config, adapter) -> int:
    """The LoRA rank whose trainable-parameter count is closest to this adapter configuration's."""
    target = adapter_parameter_count(hf_config, adapter)
    return _closest_rank(lambda r: lora_parameter_count(hf_config, r), target)
