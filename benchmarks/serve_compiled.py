"""The serving engine compiled against the engine eager, on the embedded model (a script: the machine to itself).

`fflora serve` runs transformers' continuous-batching engine (`fflora.serving.BankEngine`) eagerly.
Compiled (`BankEngine(fused, ..., compile=True)`: transformers' compiled varlen step, the bank's
windows fixed, the adapters' selection held outside the graph) each step should lose the Python
overhead that the compiled decode of `fflora generate` loses. This script measures whether it
does: two engines over two copies of the same bank (the same adapters), the same requests,
interleaved rounds; it records the compile time, the graphs and graph breaks Dynamo made, and
the tokens per second of each engine and whether their tokens agree.

    python benchmarks/serve_compiled.py [--requests 1 4 8] [--rounds 3] [--out results/serve-compiled]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

import fflora
from fflora.bench.serve import make_adapters
from fflora.models.base_models import load_base_model
from fflora.serving import BankEngine

ADAPTERS = 4


def engine_for(adapters: list[Path], compile: bool, args) -> BankEngine:
    model, _ = load_base_model(None)
    fused = fflora.FusedModel.build(model, max_adapters=8, rank_budget=args.rank_budget)
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(max_batch_tokens=256, num_blocks=32, page_size=256)
    engine = BankEngine(fused, config, cb, compile=compile)
    for i, path in enumerate(adapters):
        engine.load_adapter(path, f"a{i}")
    return engine


def one_round(engine: BankEngine, requests: int, args) -> dict:
    """`requests` requests at once (adapter i mod 4, 64-token prompts, `new_tokens` each): wall time and tokens/s."""
    prompts = [[(37 * (i + 1) * (j + 3)) % 20000 + 100 for j in range(args.prompt_len)] for i in range(requests)]
    began = time.perf_counter()
    ids = [engine.add_request(p, adapter=f"a{i % ADAPTERS}") for i, p in enumerate(prompts)]
    tokens = [engine.wait(rid).generated_tokens for rid in ids]
    wall = time.perf_counter() - began
    return {"wall_s": wall, "tokens_per_s": requests * args.new_tokens / wall, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank-budget", type=int, default=64, help="rank room per space (8 adapters of r=8)")
    parser.add_argument("--out", default="results/serve-compiled")
    args = parser.parse_args()
    torch.set_num_threads(2)
    base, _ = load_base_model(None)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        adapters = make_adapters(base, Path(tmp), ADAPTERS, rank=8, seed=0)
        del base
        engines = {"eager": engine_for(adapters, False, args), "compiled": engine_for(adapters, True, args)}
        began = time.perf_counter()
        engines["compiled"].start()
        print(f"compiled engine started in {time.perf_counter() - began:.1f} s", flush=True)
        engines["eager"].start()
        runs: dict[str, list[dict]] = {}
        try:
            for n in args.requests:  # a first round of each size compiles what the warm-up did not
                one_round(engines["compiled"], n, args)
            stats = dict(torch._dynamo.utils.counters["stats"])
            breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
            for round_ in range(args.rounds):
                for n in args.requests:
                    for mode, engine in engines.items():
                        run = one_round(engine, n, args)
                        runs.setdefault(f"{mode}|{n}", []).append(run)
                        print(f"round {round_ + 1}: {mode}, {n} requests: {run['tokens_per_s']:.1f} tokens/s", flush=True)
        finally:
            for engine in engines.values():
                engine.stop()
    rows = []
    for n in args.requests:
        eager, compiled = (statistics.median(r["tokens_per_s"] for r in runs[f"{m}|{n}"]) for m in ("eager", "compiled"))
        same = all(a["tokens"] == b["tokens"] for a, b in zip(runs[f"eager|{n}"], runs[f"compiled|{n}"]))
        rows.append({"requests": n, "eager_tokens_per_s": eager, "compiled_tokens_per_s": compiled,
                     "compiled_over_eager": compiled / eager, "same_tokens": same,
                     "rounds": {m: [r["tokens_per_s"] for r in runs[f"{m}|{n}"]] for m in ("eager", "compiled")}})
    result = {"model": "SmolLM2-135M-Instruct (embedded), float32, 2 threads",
              "settings": {**vars(args), "adapters": ADAPTERS, "rank": 8},
              "compile_seconds": engines["compiled"].compile_seconds,
              "dynamo": {"unique_graphs": stats.get("unique_graphs"), "graph_breaks": breaks}, "rows": rows}
    lines = [f"{result['model']}; {ADAPTERS} FFBA adapters (r=8), request i uses adapter i mod {ADAPTERS}; prompts of "
             f"{args.prompt_len} tokens, {args.new_tokens} new tokens; medians of {args.rounds} interleaved rounds", "",
             f"Compiled engine: compile at start {result['compile_seconds']:.1f} s; Dynamo made "
             f"{stats.get('unique_graphs')} graphs with {breaks} graph breaks", "",
             "| requests at once | eager tokens/s | compiled tokens/s | compiled / eager | same tokens |",
             "|---:|---:|---:|---:|---|"]
    lines += [f"| {r['requests']} | {r['eager_tokens_per_s']:.1f} | {r['compiled_tokens_per_s']:.1f} | "
              f"{r['compiled_over_eager']:.2f} | {r['same_tokens']} |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compiled.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "compiled.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
