"""A compiled decode step: every decode step of a fused model runs as one `torch.compile` graph.

The fused form traces into a single graph (no graph breaks: an FFBA layer's state is a plain object,
and the embeddings' require-grad hook is off while fused), so inductor can fuse the element-wise
work between the GEMMs (norms, rotary embeddings, SiLU * up, residual adds, FFBA's concats and
slices) and drop the Python overhead of ~30 modules per layer.

We use transformers' own mechanism rather than a decode loop of ours: a static KV cache and
`generation_config.compile_config`, so `model.generate(...)` runs the prefill eagerly and the
decode steps compiled (`decode_step(model)` is the same compiled callable, for loops of one's own,
e.g. `fflora bench`). Each new batch size or cache length compiles once more: the warm-up cost,
tens of seconds per shape on SmolLM2-135M on 2 CPU cores, is paid at the first `generate`.

Compile after `fflora.plan_gemms` (the graph runs the planned layouts; planning again drops the
compiled step). `fflora.unfuse` restores the generation settings the model had before.

This module knows nothing of adapters or fused models: `FusedModel.compile` (what `fflora.compile_decode`
calls) keeps the settings to restore and fixes a bank's windows before it compiles here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers import CompileConfig

RECOMPILE_LIMIT = 64


def compile_generation(model: nn.Module, freezing: bool = False, cpp_wrapper: bool = False) -> nn.Module:
    """Make `model.generate` run each decode step as one compiled graph, for any transformers causal
    LM (a stock model, or one with PEFT LoRA layers injected): what its users do to compile it, a static
    cache and `generation_config.compile_config`, with the settings `compile_decode` uses. In place;
    returns the model. Nothing is restored later: `compile_decode` is the form for fused models."""
    config = model.generation_config
    options = {name: True for name, on in (("freezing", freezing), ("cpp_wrapper", cpp_wrapper)) if on}
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode=None,  # inductor defaults (no CUDA graphs)
                                   options=options or None)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA-like devices only, unless told
    # One graph per (model, batch size, cache length): beyond Dynamo's default of 8 it would fall back
    # to eager without a word.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    config.cache_implementation, config.compile_config = "static", compile_config
    drop_compiled_step(model)  # transformers' cached compiled forward, traced before
    return model


def engine_compile_settings() -> None:
    """Set, in the current thread, what a serving engine's compiled steps need from Dynamo: layer indices
    not specialized as constants (one graph serves every layer's frame if a step breaks), and the
    recompile limit of `compile_decode`."""
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def is_compiled(model: nn.Module) -> bool:
    """Whether `generate` runs this model's decode steps compiled on this device (`compile_generation`
    or `compile_decode` ran on it, or its generation config asks for the same)."""
    config = getattr(model, "generation_config", None)
    return (config is not None and config.cache_implementation == "static"
            and getattr(config.compile_config, "_compile_all_devices", False))


def decode_step(model: nn.Module) -> Callable:
    """The compiled forward that `generate` uses for decode steps (call it with a `StaticCache`)."""
    if not is_compiled(model):
        raise ValueError("this model has no compiled decode step; call fflora.compile_decode(model) "
                         "(fused) or fflora.fastpath.compile.compile_generation(model) first")
    return model.get_compiled_call(model.generation_config.compile_config)


def drop_compiled_step(model: nn.Module) -> None:
    """Forget transformers' cached compiled forward (it is built again, from the current model, when next
    needed): after the GEMMs changed layout, or when the compile settings changed."""
    model.__dict__.pop("_compiled_call", None)
    model.__dict__.pop("_last_compile_config", None)
