"""FFBA's configuration: the family of fused forward-backward adapters (FFBA, and its FA-only and
BA-only variants)."""

from __future__ import annotations

from dataclasses import dataclass

from peft import PeftConfig

from ..config import SUB_BLOCKS, AdapterConfigMixin

PHIS = ("identity", "relu", "silu")
FFBA_PEFT_TYPE = "FFBA"


@dataclass
class FFBAConfig(AdapterConfigMixin, PeftConfig):
    """Configuration of a family of fused forward-backward adapters (see `docs` in the README).

    r, alpha:            rank and scaling numerator of the forward adapter (FA); the scale is alpha / r.
    r_backward, alpha_backward:
                         the same for the backward adapter (BA); None means "same as r / alpha".
    forward, backward:   which adapter kinds to build (FA only = FFA, BA only, or both = FFBA).
    sub_blocks:          sub-blocks that carry adapters: "attn", "mlp" or both. A sub-block listed
                         here gets an FA across itself and a BA from its output projection to the
                         input projections of the next sub-block (attn -> mlp of the same layer,
                         mlp -> attn of the next layer; the last MLP has no successor).
    phi:                 nonlinearity between the FA down- and up-projection.
    dropout:             dropout probability on the adapters' inputs (training form only).
    """

    r: int = 8
    alpha: float = 16.0
    r_backward: int | None = None
    alpha_backward: float | None = None
    forward: bool = True
    backward: bool = True
    sub_blocks: tuple[str, ...] = SUB_BLOCKS
    phi: str = "identity"
    dropout: float = 0.0

    PEFT_TYPE = FFBA_PEFT_TYPE
    _RANKS = ("r", "r_backward")
    _ALPHAS = ("alpha", "alpha_backward")

    def validate(self) -> None:
        super().validate()
        if self.phi not in PHIS:
            raise ValueError(f"FFBAConfig.phi must be one of {PHIS}, got {self.phi!r}")
        if not (self.forward or self.backward):
            raise ValueError(
                "FFBAConfig: forward and backward are both False, so there is no adapter; "
                "enable at least one of them"
            )

    @property
    def rank_backward(self) -> int:
        return self.r if self.r_backward is None else self.r_backward

    @property
    def scale_forward(self) -> float:
        return self.alpha / self.r

    @property
    def scale_backward(self) -> float:
        alpha = self.alpha if self.alpha_backward is None else self.alpha_backward
        return alpha / self.rank_backward
