"""The dtype a training run computes in: float32, or bfloat16 autocast where it is faster.

`dtype="auto"` is decided once per machine and model by a measurement kept in the cache, so that
every method trained on one machine trains in one dtype (`choose_dtype`); a run records its choice
in its folder (`DTYPE_FILE`), which a resumed run keeps.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from ..utils.files import atomic_write_text
from ..utils.sources import cache_dir
from .examples import token_nll

DTYPE_FILE = "dtype.json"  # what dtype="auto" chose, and the measurement: a resumed run keeps it


def dtype_autocast(dtype: str, device: str):
    """bfloat16 autocast on `device` for dtype "bfloat16"; nothing (float32) otherwise."""
    return torch.autocast(device, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def step_seconds(model, batch: dict, dtype: str, steps: int = 2) -> float:
    """Seconds of one forward + backward of the training loss on `batch` in `dtype` (after a warm-up
    step); gradients are dropped and the RNG state is restored, so the run itself is unchanged."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(steps + 1):
            if i == 1:
                start = time.perf_counter()
            with dtype_autocast(dtype, device.type):
                loss = token_nll(model, batch).mean()
            loss.backward()
        seconds = (time.perf_counter() - start) / steps
    for p in model.parameters():
        p.grad = None
    model.train(was_training)
    return seconds


def machine_dtype_file() -> Path:
    """Where `auto` keeps what it measured, per machine and model (`machine_key`)."""
    return cache_dir() / "machine-dtype.json"


def machine_key(model: nn.Module) -> str:
    """What decides whether bfloat16 trains faster: the CPU's model name, the flags that give bfloat16
    arithmetic (avx512_bf16, amx_bf16; AVX2 alone emulates it), the threads torch uses, torch's version,
    and the base model (its name and shape, not the adapter's parameters: a tiny model is all
    overhead, where a 135M one is all GEMMs). Runs with one key, whatever their method, get one dtype."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = {key.strip(): value.strip() for key, value in
              (line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)}
    name = fields.get("model name") or platform.processor() or "unknown"
    flags = set(fields.get("flags", "").split())
    bf16 = ",".join(sorted(flags & {"avx512_bf16", "amx_bf16", "avx512f", "avx2"})) or "none"
    config = model.config.get_text_config()  # the base model's, with or without an adapter on it
    shape = f"{config.num_hidden_layers} x {config.hidden_size}, vocabulary {config.vocab_size}"
    return (f"{name} | {bf16} | {torch.get_num_threads()} threads | torch {torch.__version__} | "
            f"{config._name_or_path or 'unnamed model'} ({shape})")


def choose_dtype(requested: str, model, batch: dict, out: Path, resume: bool) -> dict:
    """{"dtype": "float32" | "bfloat16", "why": ..., ["seconds_per_step": {...}]} for a run that asked
    for `requested` ("auto", "float32" or "bfloat16") and writes to `out`.

    `auto` on a CPU is decided once per machine and model (`machine_key`): the first run there times
    a training step of its first batch in both dtypes, interleaved, and the faster is kept in the
    cache ($FFLORA_CACHE/machine-dtype.json; delete it to measure again); every later run, whatever
    its method, reads it, so that two methods compared on one machine train in one dtype (a
    measurement per run gave FFBA float32 and LoRA bfloat16 on a busy machine). With avx512_bf16,
    bf16 autocast trains SmolLM2 1.5-3x faster; on AVX2-only CPUs it was slower. On CUDA, bf16 where
    the GPU supports it. A resumed run keeps the choice it started with."""
    saved = out / DTYPE_FILE
    if resume and saved.is_file():
        return json.loads(saved.read_text())
    if requested != "auto":
        choice = {"dtype": requested, "why": "set by the run"}
    elif torch.cuda.is_available():
        fast = torch.cuda.is_bf16_supported()
        choice = {"dtype": "bfloat16" if fast else "float32",
                  "why": "CUDA " + ("supports" if fast else "lacks") + " bfloat16"}
    else:
        choice = _machine_dtype(model, batch)
    atomic_write_text(saved, json.dumps(choice, indent=2) + "\n")
    return choice


def _machine_dtype(model, batch: dict) -> dict:
    """This machine's dtype from the cache, or measured now (interleaved, two rounds, the faster
    round of each) and cached."""
    cache = machine_dtype_file()
    key = machine_key(model)
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key in known:
        return known[key] | {"why": f"measured once on this machine ({cache}; delete it to measure again)"}
    seconds = {"float32": [], "bfloat16": []}
    for _ in range(2):
        for dtype in seconds:
            seconds[dtype].append(step_seconds(model, batch, dtype))
    best = {dtype: min(values) for dtype, values in seconds.items()}
    choice = {"dtype": min(best, key=best.get), "seconds_per_step": best,
              "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(cache, json.dumps(known | {key: choice}, indent=2) + "\n")
    return choice | {"why": f"measured: the faster training step on this CPU (kept for every later run in {cache})"}
