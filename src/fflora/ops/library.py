"""fflora's own PyTorch operators (`torch.ops.fflora.*`), defined on one `torch.library.Library`.

Eager and compiled steps call them: Dynamo keeps each as one opaque node (its fake function gives
the output's shape), so inductor neither traces into it nor copies a tensor it mutates. They are
defined with the low-level library (schema, kernel, fake) rather than `torch.library.custom_op`,
whose Python wrapper (autograd and argument handling) costs about 10 us a call here against 1-2:
a decode step on SmolLM2 calls them 151 times (121 packed GEMMs, 30 KV-cache writes). They serve
inference only (no autograd formula).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIBRARY = torch.library.Library("fflora", "FRAGMENT")


def define_op(schema: str, kernel: Callable, fake: Callable) -> Callable:
    """Define `torch.ops.fflora.<name>` from `schema` ("name(Tensor x, ...) -> Tensor"; a mutated argument
    written `Tensor(a!)`), run by `kernel` on every device and by `fake` on fake tensors (shapes only).
    Returns the operator's default overload, what callers call."""
    name = schema.split("(", 1)[0]
    _LIBRARY.define(schema)
    _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fflora::{name}", fake, lib=_LIBRARY)
    return getattr(torch.ops.fflora, name).default
