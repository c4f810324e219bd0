"""The adapter methods fflora knows, and how the rest of the package finds the one it needs: from a
configuration, a PEFT type, fflora 0.1.0's format name, a name, or the model that carries it.

A method is its folder: every `methods/<name>/method.py` (`fflora.utils.method_names`) is imported here
and its `METHOD` registered; nothing else lists the methods.
"""

from __future__ import annotations

import importlib
from dataclasses import fields

from torch import nn

from ..utils.method_names import method_names
from .interface import Method

METHODS: tuple[Method, ...] = tuple(importlib.import_module(f"{__package__}.{name}.method").METHOD for name in method_names())
ATTRIBUTE = "ffba_config"  # on a model in training form (or fused from it): the configuration of its adapter


def by_name(name: str) -> Method:
    """The method called `name` ("ffba", "zflora"); a ValueError listing them otherwise."""
    for method in METHODS:
        if method.name == name:
            return method
    raise ValueError(f"unknown adapter method {name!r}; fflora has {[m.name for m in METHODS]}")


def names() -> list[str]:
    """The methods' names, in registry order."""
    return [m.name for m in METHODS]


def make_config(name: str, **options):
    """The configuration of method `name` from the options it takes; options that only other methods
    take (e.g. FFBA's phi for zFLoRA) are left out, as the CLI's shared adapter options need."""
    config_class = by_name(name).config_class
    known = {f.name for f in fields(config_class)}
    return config_class(**{k: v for k, v in options.items() if k in known})


def for_config(config, caller: str = "fflora") -> Method:
    """The method that builds adapters from `config`; a TypeError naming the accepted classes otherwise."""
    for method in METHODS:
        if isinstance(config, method.config_class):
            return method
    names = " or a ".join(m.config_class.__name__ for m in METHODS)
    raise TypeError(f"{caller} expects an {names}, got {type(config).__name__}")


def by_peft_type(peft_type: str) -> Method | None:
    """The method of PEFT type `peft_type` ("FFBA", "ZFLORA"), or None if it is not one of fflora's."""
    return next((m for m in METHODS if m.peft_type == peft_type), None)


def by_legacy_format(format_name: str) -> Method | None:
    """The method of an fflora 0.1.0 adapter format ("fflora-ffba/1", ...), or None."""
    return next((m for m in METHODS if m.legacy_format == format_name), None)


def bank_method() -> Method:
    """The method whose adapters an adapter bank holds."""
    return next(m for m in METHODS if m.supports_bank)


def adapter_config(model: nn.Module):
    """The configuration of the adapter `model` carries (training form, or fused from it), or None."""
    return getattr(model, ATTRIBUTE, None)


def method_of(model: nn.Module) -> Method | None:
    """The method of the adapter `model` carries, or None."""
    config = adapter_config(model)
    return None if config is None else for_config(config)
