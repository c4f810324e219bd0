"""Where the time of the serving engine's compiled decode step goes, and what Dynamo's guards cost (issue 43).

    python benchmarks/profile_engine_step.py [--weights bfloat16] [--out results/profile-engine-step]

The engine under `fflora serve` (`SlotEngine`, `compile=True`) on the embedded SmolLM2 with a bank of 8 random
FFBA r = 8 adapters, serving 8 requests at once (64-token prompts, 64 new tokens, each on its own adapter) in
the main thread as the server runs it. Two measurements:

- torch.profiler over the decode steps of 8 rows of one burst (inductor's kernels profiled one by one,
  `cpp.enable_kernel_profile`), self CPU time per step grouped by kind of work;
- what the GEMMs alone cost: the model's weight shapes (30 layers' fused QKV, O, gate-up and down, and the LM
  head) at 8 rows in bfloat16, packed for oneDNN as the engine runs them, against the bytes this machine
  reads per second (a sum over 256 MB): the floor of a step;
- the same decode step (8 rows, 100 positions each) without the profiler, compiled three ways and timed
  interleaved: with all of Dynamo's guards (what the engine runs), with only the tensor guards, with none.
  Outputs are checked equal. What the guards cost decides whether dropping them is worth the risk (without
  them a bank whose layout changed would run a stale graph in silence).

Run it with the CPU to itself.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch._inductor import config as inductor_config

import fflora
from fflora.bench.serve import make_adapters
from fflora.ops.gemm import onednn_linear, packed
from fflora.serving import SlotEngine
from fflora.serving.slots import slot_forward

sys.path.insert(0, str(Path(__file__).parent))
from serve_engines import run_engine  # noqa: E402  (the engine served 8 streams in the main thread)

GROUPS = (("GEMMs (oneDNN, int4 / int8 kernels)", ("_linear_pointwise", "_weight_int4pack_mm", "_weight_int8pack_mm", "aten::mm")),
          ("GEMM operator dispatch (fflora::packed_linear)", ("fflora::packed_linear",)),
          ("attention kernels (keys gathered, scores, softmax, values)", ("cpp_fused__softmax",)),
          ("other inductor kernels (norms, rotary, SiLU, residuals)", ("cpp_fused", "cpp_cpu")),
          ("Dynamo's guard check", ("TorchDynamo Cache Lookup",)),
          ("the compiled graph's Python wrapper", ("Call CompiledFxGraph",)),
          ("KV-cache writes", ("slot_write", "index_put")),
          ("greedy argmax", ("aten::argmax",)))
GUARDS = {"all guards (the engine)": None, "tensor guards only": torch.compiler.keep_tensor_guards_unsafe,
          "no guards": torch.compiler.skip_all_guards_unsafe}


def group_of(name: str) -> str:
    return next((group for group, keys in GROUPS if any(k in name for k in keys)), "other")


def build(weights: str) -> tuple[SlotEngine, int]:
    base, _ = fflora.load_base_model()
    fused = fflora.FusedModel.build(copy.deepcopy(base), max_adapters=8, weights=weights)
    for i, path in enumerate(make_adapters(base, Path(tempfile.mkdtemp()), 8, 8, 0)):
        fused.load(f"a{i}", path)
    return SlotEngine(fused, slots=8, max_len=256, compile=True), base.config.vocab_size


def profile_burst(engine: SlotEngine, vocab: int, skip: int = 5, steps: int = 15) -> dict:
    """Self CPU ms per decode step of 8 rows (steps `skip` to `skip + steps` of a burst of 8 requests)."""
    decode, profiles = engine._decode, []

    def profiled(requests):
        if len(requests) == 8 and len(profiles) < skip + steps:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                decode(requests)
            profiles.append(prof)
        else:
            decode(requests)

    engine._decode = profiled
    try:
        run_engine(engine, 8, vocab)
    finally:
        engine._decode = decode
    ops = defaultdict(lambda: [0.0, 0])
    for prof in profiles[skip:]:
        for event in prof.key_averages():
            ops[event.key][0] += event.self_cpu_time_total / 1e3 / steps
            ops[event.key][1] += event.count / steps
    groups = defaultdict(float)
    for name, (ms, _) in ops.items():
        groups[group_of(name)] += ms
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:15]
    return {"steps": steps, "ms_per_step": sum(groups.values()), "groups_ms": dict(groups),
            "top_ops": {name: {"ms_per_step": ms, "calls_per_step": calls} for name, (ms, calls) in top}}


@torch.no_grad()
def time_guards(engine: SlotEngine, steps: int = 40) -> dict:
    """Median ms of one decode step of 8 rows at 100 positions, compiled with each guard setting, interleaved."""
    rows, names = torch.arange(8), [f"a{i}" for i in range(8)]
    engine.cache.lengths[:8] = 100
    ids = torch.randint(10, 1000, (8, 1), generator=torch.Generator().manual_seed(0))
    decoders = {name: engine._decoder if keep is None else
                torch.compile(functools.partial(slot_forward, engine.model, engine.cache), dynamic=False,
                              options={"guard_filter_fn": keep}) for name, keep in GUARDS.items()}

    def step(decoder):
        engine._decoder = decoder
        return engine._graph_step(rows, engine.cache.lengths[rows], ids, names, 101)

    reference = step(decoders["all guards (the engine)"])
    for name, decoder in decoders.items():
        for _ in range(3):
            if not torch.equal(step(decoder), reference):
                raise RuntimeError(f"the step compiled with {name} gave other logits")
    times = {name: [] for name in decoders}
    for _ in range(steps):
        for name, decoder in decoders.items():
            begun = time.perf_counter()
            step(decoder)
            times[name].append(1e3 * (time.perf_counter() - begun))
    engine._decoder = decoders["all guards (the engine)"]
    engine.cache.lengths[:8] = 0
    return {name: statistics.median(t) for name, t in times.items()}


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        begun = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - begun))
    return statistics.median(times)


@torch.no_grad()
def gemm_floor(config, rows: int = 8) -> dict:
    """ms of the model's GEMMs at `rows` rows in bfloat16 (oneDNN-packed, random weights), and the machine's
    read bandwidth (GB/s, a sum over 256 MB)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.hidden_size // heads
    shapes = [(hidden + 2 * kv_heads * head_dim, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)]
    layers = [[packed(torch.randn(n, k, dtype=torch.bfloat16), rows) for n, k in shapes]
              for _ in range(config.num_hidden_layers)]
    inputs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for _, k in shapes}
    head = packed(torch.randn(config.vocab_size, hidden, dtype=torch.bfloat16), rows)

    def run_layers():
        for weights in layers:
            for (_, k), w in zip(shapes, weights):
                onednn_linear(inputs[k], w)

    big = torch.ones(128 * 2**20, dtype=torch.bfloat16)
    layer_bytes = 2 * sum(n * k for n, k in shapes) * config.num_hidden_layers
    layers_ms = median_ms(run_layers, 10)
    return {"rows": rows, "layers_ms": layers_ms, "layers_gb": layer_bytes / 1e9,
            "layers_gb_per_s": layer_bytes / layers_ms / 1e6,
            "lm_head_ms": median_ms(lambda: onednn_linear(inputs[hidden], head), 20),
            "read_gb_per_s": big.numel() * 2 / median_ms(big.sum, 10) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="bfloat16", choices=["float32", "bfloat16", "int8", "int4"])
    parser.add_argument("--out", type=Path, default=Path("results/profile-engine-step"))
    args = parser.parse_args()
    torch.manual_seed(0)
    inductor_config.cpp.enable_kernel_profile = True
    engine, vocab = build(args.weights)
    run_engine(engine, 8, vocab)  # compile (at start) and warm
    run_engine(engine, 8, vocab)
    result = {"weights": args.weights, "profile": profile_burst(engine, vocab), "guards_ms": time_guards(engine),
              "gemm_floor": gemm_floor(engine.model.config.get_text_config())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile-engine-step.json").write_text(json.dumps(result, indent=2) + "\n")
    p = result["profile"]
    lines = [f"The serving engine's compiled decode step, 8 rows on 8 adapters, {args.weights} (self CPU ms per step "
             f"under torch.profiler, mean of {p['steps']} steps of a burst)", "",
             "| work | ms per step |", "|---|---:|"]
    lines += [f"| {g} | {ms:.2f} |" for g, ms in sorted(p["groups_ms"].items(), key=lambda kv: -kv[1])]
    lines += [f"| **step** | **{p['ms_per_step']:.2f}** |", "", "| op | ms per step | calls per step |", "|---|---:|---:|"]
    lines += [f"| {name[:90]} | {op['ms_per_step']:.3f} | {op['calls_per_step']:.0f} |" for name, op in p["top_ops"].items()]
    lines += ["", "The same step without the profiler (8 rows at 100 positions; median of 40, interleaved):", "",
              "| compiled with | ms per step |", "|---|---:|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in result["guards_ms"].items()]
    g = result["gemm_floor"]
    lines += ["", f"The GEMMs alone, {g['rows']} rows, bfloat16, oneDNN-packed: the {g['layers_gb']:.2f} GB of the layers' "
              f"weights in {g['layers_ms']:.2f} ms ({g['layers_gb_per_s']:.1f} GB/s; this machine reads "
              f"{g['read_gb_per_s']:.1f} GB/s), the LM head {g['lm_head_ms']:.2f} ms more."]
    (args.out / "profile-engine-step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
