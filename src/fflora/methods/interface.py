"""`Method`: what differs between adapter methods, behind one interface.

The rest of fflora (the generic operations in `adapters`, serialization, the PEFT tuners, fastpath,
serving, recipes, the CLI and the benches) reaches a method only through this interface, found in
`registry` from a configuration, a PEFT type or the model itself; it never asks which method it
holds. A new method is a folder under `methods/` with its configuration, layers, fused form and a
`Method` (`METHOD` in its `method.py`), found there by the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn


class Method(ABC):
    """One adapter method. Subclasses set the class attributes and implement the operations; the
    generic checks (configuration type, architecture, an adapter already present, a fused model)
    are done by the caller (`fflora.methods.adapters`) before any of these runs."""

    name: str  # "ffba", "zflora": the kind in run records and the CLI
    title: str  # how messages name it: "FFBA", "zFLoRA"
    peft_type: str  # PEFT's peft_type in adapter_config.json
    config_class: type  # its PeftConfig subclass
    legacy_format: str  # the "format" of fflora 0.1.0's adapter_config.json
    tuner_prefix: str  # PEFT's prefix of its parameter names (its tuner's `prefix`)
    supports_bank: bool = False  # whether its adapters can join an adapter bank
    exports_to_vllm: bool = False  # whether `fflora export vllm` writes its fused form for fflora's vLLM plugin

    def __deepcopy__(self, memo) -> Method:
        """The same method: one registry entry per method, compared by identity (a deep copy of a model that
        holds it keeps it)."""
        return self

    # --- training form ---

    @abstractmethod
    def apply(self, model: nn.Module, config) -> None:
        """Build the adapter on `model` in place (every base parameter frozen; only the adapter's trains);
        validate everything first, so that a ValueError leaves the model untouched."""

    @abstractmethod
    def remove(self, model: nn.Module) -> None:
        """Take the adapter off a model in training form: the plain base model again."""

    @abstractmethod
    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The live adapter parameters under their canonical keys (`layers.{i}.{attn|mlp}.{name}`, ...),
        the keys of every saved state dict."""

    @abstractmethod
    def canonical_key(self, saved_name: str) -> str | None:
        """The canonical key of a saved tensor name (PEFT's `base_model.model.<parameter name>`), or None
        if no parameter of this method has that name."""

    def ignored_keys(self, model: nn.Module) -> set[str]:
        """Canonical keys that older saved adapters hold but this version drops on load."""
        return set()

    @abstractmethod
    def parameter_count(self, hf_config, config) -> int:
        """Trainable parameters of an adapter with `config` on a model with this transformers config."""

    # --- fused form ---

    @abstractmethod
    def fuse(self, model: nn.Module, config):
        """Install the fused GEMMs (`fflora.methods.fused`) in every sub-block, the adapter (configured by
        `config`) written into them; returns what the fused form keeps to refresh it (FFBA: its
        one-adapter bank), or None. The `FusedModel` holds it and hands it to `refresh_fused`."""

    @abstractmethod
    def unfuse(self, model: nn.Module) -> None:
        """Back to the training form: the base nn.Linear modules rebuilt bit for bit, the adapter around them."""

    @abstractmethod
    def refresh_fused(self, model: nn.Module, fused_form) -> None:
        """After the adapter's parameters changed in a fused model, rewrite its rows/columns in place
        (`fused_form`: what `fuse` returned)."""

    @abstractmethod
    def unload_fused(self, model: nn.Module) -> None:
        """PEFT's merge_and_unload: take the adapter's training-form modules (PEFT's tuner layers) out of a
        fused model, keeping what its fused form runs; `remove` still takes the method's remains off once
        the model is unfused (the adapter is gone then: the plain base)."""

    def build_bank(self, model: nn.Module, max_adapters: int, rank_budget: int):
        """Fuse a plain base model with room for a bank of this method's adapters; returns the bank
        (only where `supports_bank`)."""
        raise NotImplementedError(f"{self.title} has no adapter bank")

    def bank_ranks(self, config) -> dict[str, int]:
        """The rank an adapter with `config` takes in each of the bank's rank spaces (only where `supports_bank`)."""
        raise NotImplementedError(f"{self.title} has no adapter bank")

    def unfuse_bank(self, model: nn.Module) -> None:
        """Undo `build_bank`: the plain base model again (the bank's adapters are dropped)."""
        raise NotImplementedError
