"""What every method's configuration shares (`AdapterConfigMixin`): validation of the common fields,
the method's own fields, and the JSON form.

Each method's configuration (`ffba.config.FFBAConfig`, `zflora.config.ZFLoRAConfig`) is a
`peft.PeftConfig` subclass with this mixin, so `get_peft_model(model, FFBAConfig(r=8))` is the same
one-line change as for any PEFT method, and PEFT's `adapter_config.json` round-trips it. Like PEFT's
configurations they are mutable; `validate()` runs on construction and again when an adapter is
built from one.
"""

from __future__ import annotations

from dataclasses import asdict, fields

from peft import PeftConfig

SUB_BLOCKS = ("attn", "mlp")
_PEFT_FIELDS = frozenset(f.name for f in fields(PeftConfig))


class AdapterConfigMixin:
    """Mixed into a method's `PeftConfig` subclass (before it). The subclass names its `PEFT_TYPE`, its
    integer ranks (`_RANKS`) and positive scaling numerators (`_ALPHAS`); it has `sub_blocks` and `dropout`."""

    PEFT_TYPE: str
    _RANKS: tuple[str, ...]
    _ALPHAS: tuple[str, ...]

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
        """The configuration from its JSON form; unknown fields are named, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known - _PEFT_FIELDS)}")
        return cls(**d)
