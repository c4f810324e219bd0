"""zFLoRA behind the `Method` interface: its training form (`model`), fused form (`fused`) and
parameter budget."""

from __future__ import annotations

from torch import nn

from ...models.architectures import projection_dims
from ..fused import refresh_adapters
from ..interface import Method
from ..layers import canonical_sub_block_key
from .config import ZFLORA_PEFT_TYPE, ZFLoRAConfig
from .fused import adapter_of, fuse_zflora, unfuse_zflora
from .model import MERGE_KEY, attach_zflora, detach_zflora, unload_fused_zflora, unread_keys, zflora_adapter_parameters


def zflora_parameter_count(hf_config, cfg: ZFLoRAConfig) -> int:
    """Trainable parameters of zFLoRA (shared/design/zflora.md): per layer, attention (d_q + 2*kv)*r
    (B_in) + d_q*r (A_out) and MLP 2*inter*r + inter*r, for the sub-blocks that carry it; plus d*r (B_m);
    less the B_in of the first such sub-block, which would read a state nothing has written yet."""
    k = projection_dims(hf_config)
    reads = {"attn": (k["d_q"] + 2 * k["kv"]) * cfg.r, "mlp": 2 * k["inter"] * cfg.r}
    writes = {"attn": k["d_q"] * cfg.r, "mlp": k["inter"] * cfg.r}
    first = next(s for s in ("attn", "mlp") if s in cfg.sub_blocks)
    per_layer = sum(reads[s] + writes[s] for s in cfg.sub_blocks)
    return k["layers"] * per_layer + k["d"] * cfg.r - reads[first]


class ZFLoRA(Method):
    name = "zflora"
    title = "zFLoRA"
    peft_type = ZFLORA_PEFT_TYPE
    config_class = ZFLoRAConfig
    legacy_format = "fflora-zflora/1"
    tuner_prefix = "z_"  # its parameters: z_in, z_out, and the head's z_merge

    def apply(self, model: nn.Module, config: ZFLoRAConfig) -> None:
        attach_zflora(model, config)

    def remove(self, model: nn.Module) -> None:
        detach_zflora(model)

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return zflora_adapter_parameters(model)

    def canonical_key(self, saved_name: str) -> str | None:
        if saved_name.endswith(".z_merge"):
            return MERGE_KEY
        return canonical_sub_block_key(saved_name, "zflora")

    def ignored_keys(self, model: nn.Module) -> set[str]:
        return unread_keys(model)

    def parameter_count(self, hf_config, config: ZFLoRAConfig) -> int:
        return zflora_parameter_count(hf_config, config)

    def fuse(self, model: nn.Module, config: ZFLoRAConfig) -> None:
        fuse_zflora(model)

    def unfuse(self, model: nn.Module) -> None:
        unfuse_zflora(model)

    def refresh_fused(self, model: nn.Module, fused_form) -> None:
        refresh_adapters(model, adapter_of)

    def unload_fused(self, model: nn.Module) -> None:
        unload_fused_zflora(model)


METHOD = ZFLoRA()  # what the registry finds in this folder
