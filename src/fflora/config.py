"""Adapter configurations, validated on construction: `FFBAConfig` (FFBA and its FA-only / BA-only
variants) and `ZFLoRAConfig` (zFLoRA, the adapter state carried in the residual stream).

Both are `peft.PeftConfig` subclasses (peft_type "FFBA" and "ZFLORA"; `fflora.tuner` registers them
with PEFT), so `get_peft_model(model, FFBAConfig(r=8))` is the same one-line change as for any PEFT
method, and PEFT's `adapter_config.json` round-trips them. Like PEFT's configurations they are mutable;
`validate()` runs on construction and again when an adapter is built from one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from peft import PeftConfig

SUB_BLOCKS = ("attn", "mlp")
PHIS = ("identity", "relu", "silu")
FFBA_PEFT_TYPE = "FFBA"
ZFLORA_PEFT_TYPE = "ZFLORA"
_PEFT_FIELDS = frozenset(f.name for f in fields(PeftConfig))


class _AdapterConfigMixin:
    """What both configurations share: validation of the common fields, the method's own fields, and the
    JSON form (PEFT's `to_dict` plus `from_dict`, which names unknown fields instead of ignoring them)."""

    PEFT_TYPE: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.peft_type is None:
            self.peft_type = self.PEFT_TYPE
        self.validate()

    def validate(self) -> None:
        """ValueError naming the field for any value the adapter cannot be built from."""
        kind = type(self).__name__
        if self.peft_type != self.PEFT_TYPE:
            raise ValueError(f"{kind}.peft_type must be {self.PEFT_TYPE!r}, got {self.peft_type!r}")
        self.sub_blocks = tuple(self.sub_blocks)  # a JSON list after a round trip
        for name in self._RANKS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{kind}.{name} must be an integer >= 1, got {value!r}")
        for name in self._ALPHAS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"{kind}.{name} must be a number > 0, got {value!r}")
        unknown = [s for s in self.sub_blocks if s not in SUB_BLOCKS]
        if unknown or not self.sub_blocks:
            raise ValueError(f"{kind}.sub_blocks must be a non-empty subset of {SUB_BLOCKS}, got {self.sub_blocks!r}")
        if len(set(self.sub_blocks)) != len(self.sub_blocks):
            raise ValueError(f"{kind}.sub_blocks has duplicates: {self.sub_blocks!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{kind}.dropout must be in [0, 1), got {self.dropout!r}")

    def method_fields(self) -> dict:
        """The fields that define the adapter (not PEFT's bookkeeping: base model name, versions, task)."""
        return {k: v for k, v in asdict(self).items() if k not in _PEFT_FIELDS}

    def same_adapter(self, other) -> bool:
        """Whether `other` builds the same adapter (same class and method fields)."""
        return type(other) is type(self) and other.method_fields() == self.method_fields()

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["sub_blocks"] = list(self.sub_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known - _PEFT_FIELDS)}")
        return cls(**d)


@dataclass
class FFBAConfig(_AdapterConfigMixin, PeftConfig):
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


@dataclass
class ZFLoRAConfig(_AdapterConfigMixin, PeftConfig):
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
