"""`FFBAConfig`: which adapters, where, at which rank; validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

SUB_BLOCKS = ("attn", "mlp")
PHIS = ("identity", "relu", "silu")


@dataclass(frozen=True)
class FFBAConfig:
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "sub_blocks", tuple(self.sub_blocks))
        for name in ("r", "r_backward"):
            value = getattr(self, name)
            if value is None and name == "r_backward":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FFBAConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("alpha", "alpha_backward"):
            value = getattr(self, name)
            if value is None and name == "alpha_backward":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"FFBAConfig.{name} must be a number > 0, got {value!r}")
        if self.phi not in PHIS:
            raise ValueError(f"FFBAConfig.phi must be one of {PHIS}, got {self.phi!r}")
        if not (self.forward or self.backward):
            raise ValueError(
                "FFBAConfig: forward and backward are both False, so there is no adapter; "
                "enable at least one of them"
            )
        unknown = [s for s in self.sub_blocks if s not in SUB_BLOCKS]
        if unknown or not self.sub_blocks:
            raise ValueError(
                f"FFBAConfig.sub_blocks must be a non-empty subset of {SUB_BLOCKS}, got {self.sub_blocks!r}"
            )
        if len(set(self.sub_blocks)) != len(self.sub_blocks):
            raise ValueError(f"FFBAConfig.sub_blocks has duplicates: {self.sub_blocks!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FFBAConfig.dropout must be in [0, 1), got {self.dropout!r}")

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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sub_blocks"] = list(self.sub_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FFBAConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"FFBAConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)
