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
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from transformers import CompileConfig, ContinuousBatchingConfig

from ..methods.fused_state import drop_compiled_step, require_fused

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


def compile_decode(model: nn.Module, freezing: bool = False, cpp_wrapper: bool = False) -> nn.Module:
    """Make `model.generate` (greedy or sampling) run each decode step as one compiled graph, in place;
    returns the model. `model` must be fused (`fflora.fuse`), with one adapter, none, or a bank: a
    bank's GEMMs then cover their whole room and masks choose each row's adapter (`generate(...,
    adapter_names=)` or a `select_adapters` block around `generate`).

    `freezing=True` turns on inductor's freezing pass. The graph still reads the weights at run
    time (they are inputs of the traced graph; a test loads new adapter weights into a compiled
    model, frozen or not, and checks the tokens follow them), so it is safe; on SmolLM2 here it was no
    faster than without it (`fflora bench --compile-freezing`, README).

    `cpp_wrapper=True` has inductor call the graph's kernels from generated C++ instead of Python,
    which cuts the per-step overhead that dominates small models on a CPU: on SmolLM2 here, int4 base
    8.5 -> 7.5 ms per token and FFBA int4 9.5 -> 9.0 ms, at 80-270 s of compile time (C++ builds)
    instead of 9-12 s; off by default for that cost.
    """
    state = require_fused(model, "compile_decode needs a fused model: call fflora.fuse(model) first "
                                 "(the training form is not compiled)")
    if state.bank is not None:
        state.bank.fix_windows()  # one graph for every mix of adapters (methods/ffba/bank.py)
    config = model.generation_config
    if state.compiled is None:  # the settings to restore on unfuse
        state.compiled = (config.cache_implementation, config.compile_config)
    return compile_generation(model, freezing, cpp_wrapper)


# Padding of transformers' continuous-batching steps when compiled. Its defaults (64 query tokens, 8192
# cached tokens) bucket shapes for CUDA graphs; a CPU pays for every padded token, and a dynamic-shape
# graph needs no buckets: queries are padded to a multiple of 8 only (no padding measured no faster on
# SmolLM2), the keys and values read to one KV-cache page.
ENGINE_QUERY_PADDING = 8


def compile_engine_step(model: nn.Module, cb_config: ContinuousBatchingConfig) -> ContinuousBatchingConfig:
    """Settings under which transformers' continuous-batching engine runs each step of a fused bank
    model compiled: a copy of `cb_config` with a compile config for its (varlen) step, dynamic in the
    number of tokens, and the bank's windows fixed (one graph for every mix of adapters, the masks
    read from the bank's `BankStep`, which the engine sets before each step).

    Not one graph per step as `compile_decode` makes: transformers wraps its paged KV-cache update in
    `torch.compiler.disable`, so each attention layer breaks the graph.
    """
    state = require_fused(model, "compiling the engine's step needs a fused bank model: fflora.fuse(model, max_adapters=K)")
    if state.bank is None:
        raise ValueError("compiling the engine's step needs an adapter bank: fflora.fuse(model, max_adapters=K)")
    state.bank.fix_windows()
    config = copy.deepcopy(cb_config)
    config.varlen_compile_config = CompileConfig(fullgraph=False, dynamic=True, mode=None)  # inductor
    config.q_padding_interval_size = ENGINE_QUERY_PADDING
    config.kv_padding_interval_size = config.page_size
    return config


def engine_compile_settings() -> None:
    """Set, in the current context, what the engine's compiled step needs from Dynamo: each attention
    layer's graph break resumes in a frame of its own, which one graph serves for every layer only if
    the layer's index is not a constant; and the recompile limit of `compile_decode`."""
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
