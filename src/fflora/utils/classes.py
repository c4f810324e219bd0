"""The one place fflora changes a module's class in place, and changes it back.

Adapted decoder layers (FFBA's, zFLoRA's), a bank model (`adapter_names=` on forward and generate) and a
planned LM head take a subclass of the class they had, so that the module, its parameters and their
ties (an LM head is often the embedding matrix) stay the same objects and transformers' code keeps
calling them as before. Each such subclass records the class it extends (`BASE`); `extend` swaps a
module into one, `restore` swaps it back, and nothing else in fflora assigns `__class__`
(`tests/test_layout.py` checks).
"""

from __future__ import annotations

import functools

BASE = "_fflora_base_class"  # on each subclass made here: the class it extends


@functools.cache
def subclass(base: type, mixin: type, prefix: str, **namespace) -> type:
    """`prefix + base.__name__`: `mixin` over `base` (one class per pair, made once), with `namespace`."""
    return type(f"{prefix}{base.__name__}", (mixin, base), {BASE: base, **namespace})


def extend(module, cls: type) -> None:
    """Swap `module` into `cls`, a subclass of its class that records it (`subclass`, or one with `BASE`)."""
    if getattr(cls, BASE, None) is not type(module):
        raise TypeError(f"{cls.__name__} does not extend {type(module).__name__}")
    module.__class__ = cls


def restore(module) -> None:
    """Swap `module` back to the class it had before `extend` (nothing to do if it was not extended)."""
    base = getattr(type(module), BASE, None)
    if base is not None and BASE in type(module).__dict__:
        module.__class__ = base
