"""FFBA behind the `Method` interface: its training form (`model`), fused form (`fused`), bank
(`bank`) and parameter budget."""

from __future__ import annotations

from torch import nn

from ...models.architectures import projection_dims
from ..interface import Method
from ..layers import canonical_sub_block_key
from .bank import adapter_space_ranks, build_bank, unfuse_bank
from .config import FFBA_PEFT_TYPE, FFBAConfig
from .fused import fuse_ffba, refresh_ffba, unfuse_ffba
from .model import attach_ffba, detach_ffba, ffba_parameters, unload_fused_ffba


def ffba_parameter_count(hf_config, cfg: FFBAConfig) -> int:
    """Trainable parameters of FFBA on a Llama-family model, per the design's per-layer formula.

    Per layer: FA attn 2*d*r, FA mlp 2*d*r, BA attn->mlp d_attn*r + 2*inter*r; and for each of the
    layers-1 layers that have a successor, BA mlp->next attn inter*r + (d_q + 2*kv)*r.
    """
    k = projection_dims(hf_config)
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


class FFBA(Method):
    name = "ffba"
    title = "FFBA"
    peft_type = FFBA_PEFT_TYPE
    config_class = FFBAConfig
    legacy_format = "fflora-ffba/1"
    tuner_prefix = "ffba"
    supports_bank = True
    exports_to_vllm = True

    def apply(self, model: nn.Module, config: FFBAConfig) -> None:
        attach_ffba(model, config)

    def remove(self, model: nn.Module) -> None:
        detach_ffba(model)

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return ffba_parameters(model)

    def canonical_key(self, saved_name: str) -> str | None:
        return canonical_sub_block_key(saved_name, "ffba")

    def parameter_count(self, hf_config, config: FFBAConfig) -> int:
        return ffba_parameter_count(hf_config, config)

    def fuse(self, model: nn.Module, config: FFBAConfig):
        return fuse_ffba(model, config)

    def unfuse(self, model: nn.Module) -> None:
        unfuse_ffba(model)

    def refresh_fused(self, model: nn.Module, fused_form) -> None:
        refresh_ffba(model, fused_form)

    def unload_fused(self, model: nn.Module) -> None:
        unload_fused_ffba(model)

    def build_bank(self, model: nn.Module, max_adapters: int, rank_budget: int):
        return build_bank(model, max_adapters, rank_budget)

    def bank_ranks(self, config: FFBAConfig) -> dict[str, int]:
        return adapter_space_ranks(config)

    def unfuse_bank(self, model: nn.Module) -> None:
        unfuse_bank(model)


METHOD = FFBA()  # what the registry finds in this folder
