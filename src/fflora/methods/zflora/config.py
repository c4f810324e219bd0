"""zFLoRA's configuration (design: shared/design/zflora.md)."""

from __future__ import annotations

from dataclasses import dataclass

from peft import PeftConfig

from ..config import SUB_BLOCKS, AdapterConfigMixin

ZFLORA_PEFT_TYPE = "ZFLORA"


@dataclass
class ZFLoRAConfig(AdapterConfigMixin, PeftConfig):
    """Configuration of zFLoRA (design: shared/design/zflora.md): the residual stream is widened by
    r channels that carry the adapter state from the embedding to the LM head.

    r, alpha:    rank (the number of extra residual channels) and scaling numerator; scale = alpha / r
                 multiplies each sub-block's read of the state (B_in) and the merge at the head (B_m).
    sub_blocks:  sub-blocks that read and write the state: "attn", "mlp" or both ("attn" alone is the
                 attention-only variant, zFLoRA-MHA).
    dropout:     dropout probability on what each sub-block writes into the state (training form only).
    """

    r: int = 8
    alpha: float = 16.0
    sub_blocks: tuple[str, ...] = SUB_BLOCKS
    dropout: float = 0.0

    PEFT_TYPE = ZFLORA_PEFT_TYPE
    _RANKS = ("r",)
    _ALPHAS = ("alpha",)

    @property
    def scale(self) -> float:
        return self.alpha / self.r
