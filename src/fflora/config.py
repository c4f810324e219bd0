"""Adapter configurations, validated on construction: `FFBAConfig` (FFBA and its FA-only / BA-only
variants) and `ZFLoRAConfig` (zFLoRA, the adapter state carried in the residual stream)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

SUB_BLOCKS = ("attn", "mlp")
PHIS = ("identity", "relu", "silu")


def _check_common(cfg, ranks: tuple[str, ...], alphas: tuple[str, ...]) -> None:
    """Validate the fields both configurations share; optional ones (None) are skipped."""
    kind = type(cfg).__name__
    object.__setattr__(cfg, "sub_blocks", tuple(cfg.sub_blocks))
    for name in ranks:
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{kind}.{name} must be an integer >= 1, got {value!r}")
    for name in alphas:
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"{kind}.{name} must be a number > 0, got {value!r}")
    unknown = [s for s in cfg.sub_blocks if s not in SUB_BLOCKS]
    if unknown or not cfg.sub_blocks:
        raise ValueError(f"{kind}.sub_blocks must be a non-empty subset of {SUB_BLOCKS}, got {cfg.sub_blocks!r}")
    if len(set(cfg.sub_blocks)) != len(cfg.sub_blocks):
        raise ValueError(f"{kind}.sub_blocks has duplicates: {cfg.sub_blocks!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"{kind}.dropout must be in [0, 1), got {cfg.dropout!r}")


def _to_dict(cfg) -> dict:
    d = asdict(cfg)
    d["sub_blocks"] = list(cfg.sub_blocks)
    return d


def _from_dict(cls, d: dict):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**d)


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
        _check_common(self, ranks=("r", "r_backward"), alphas=("alpha", "alpha_backward"))
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

    to_dict = _to_dict
    from_dict = classmethod(_from_dict)


@dataclass(frozen=True)
class ZFLoRAConfig:
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

    def __post_init__(self) -> None:
        _check_common(self, ranks=("r",), alphas=("alpha",))

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    to_dict = _to_dict
    from_dict = classmethod(_from_dict)
