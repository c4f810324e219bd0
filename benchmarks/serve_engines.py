"""The engine under `fflora serve` (`SlotEngine`, eager; with --compiled-slots also compiled) without HTTP, in
the main thread as the server runs it, next to `generate` on the same bank model, eager and compiled (GEMMs
planned for 1 and 8 rows, the compiled engine's for 8, as the engine plans them at start): the speed the
server should reach (issue 43).
(The first run, in results/serve-engines/, also had transformers' continuous batching, the server's engine
until the slots replaced it.)

SmolLM2-135M (embedded), a bank of 8 random FFBA r = 8 adapters in the --weights format (float32 by
default); 64-token prompts, 64 new tokens, greedy, ignore_eos. One stream (adapter a0), then eight streams
at once, each on its own adapter. Rounds interleave the systems; medians over rounds. For `generate`, also
its decode step alone (64 new tokens less one, per token): what a server's time per output token compares
with. Run it with the CPU to itself:

    python benchmarks/serve_engines.py --rounds 3 --out results/serve-engines
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

import fflora
from fflora.bench.serve import make_adapters
from fflora.serving import SlotEngine

PROMPT, NEW = 64, 64


def prompts(count: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab, (PROMPT,), generator=gen).tolist() for _ in range(count)]


def run_engine(engine, streams: int, vocab: int) -> float:
    """Output tokens per second of `streams` requests at once, each on its own adapter. The engine runs in
    this thread, as `fflora serve` runs it (`SlotEngine.run`: a step in a second thread took 1.4-1.8x the
    time); the requests come from another thread."""
    ids = prompts(streams, vocab)
    measured = []

    def client() -> None:
        start = time.perf_counter()
        rids = [engine.add_request(p, adapter=f"a{i}", max_new_tokens=NEW, ignore_eos=True) for i, p in enumerate(ids)]
        tokens = sum(len(engine.wait(r).generated_tokens) for r in rids)
        measured.append(tokens / (time.perf_counter() - start))

    engine.run(until=lambda: bool(measured), started=lambda: threading.Thread(target=client, daemon=True).start())
    if not measured:
        raise RuntimeError(f"the engine stopped: {engine.error}")
    return measured[0]


@torch.no_grad()
def run_generate(fused, streams: int, vocab: int, new_tokens: int = NEW) -> float:
    ids = torch.tensor(prompts(streams, vocab))
    start = time.perf_counter()
    out = fused.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=[f"a{i}" for i in range(streams)],
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return streams * (out.shape[1] - PROMPT) / (time.perf_counter() - start)


def decode_ms(fused, streams: int, vocab: int) -> float:
    """`generate`'s decode step alone, ms per token per stream: (time for NEW tokens - time for 1) / (NEW - 1),
    what a server's time per output token compares with."""
    one = streams / run_generate(fused, streams, vocab, 1)
    return 1e3 * (streams * NEW / run_generate(fused, streams, vocab) - one) / (NEW - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/serve-engines"))
    parser.add_argument("--weights", default="float32", help="the bank's weight format (float32, bfloat16, int8, int4)")
    parser.add_argument("--compiled-slots", action="store_true",
                        help="also the slot engine with compiled decode steps (in one process with other models it grew past 16 GB once: see serve_slots_compiled.py)")
    args = parser.parse_args()
    torch.manual_seed(0)
    base, _ = fflora.load_base_model()
    vocab = base.config.vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(base, Path(tmp), 8, 8, 0)

        def bank():
            fused = fflora.FusedModel.build(copy.deepcopy(base), max_adapters=8, weights=args.weights)
            for i, path in enumerate(paths):
                fused.load(f"a{i}", path)
            return fused

        engines = {"slots": SlotEngine(bank(), slots=8, max_len=256)}
        if args.compiled_slots:
            engines["slots compiled"] = SlotEngine(bank(), slots=8, max_len=256, compile=True)
        eager, compiled = bank(), bank()
        for fused in (eager, compiled):  # as the engines plan theirs at start (SlotEngine's gemm_plan)
            fused.plan("auto", rows=(1, 8))
        compiled.compile()
        systems = {**{f"engine {k}": (lambda n, e=e: run_engine(e, n, vocab)) for k, e in engines.items()},
                   "generate eager": lambda n: run_generate(eager, n, vocab),
                   "generate compiled": lambda n: run_generate(compiled, n, vocab)}
        for run in systems.values():  # warm-up (compiles the compiled one for both batch sizes)
            run(1), run(8)
        samples = {(name, n): [] for name in systems for n in (1, 8)}
        decode = {(name, n): [] for name in ("generate eager", "generate compiled") for n in (1, 8)}
        for round_ in range(args.rounds):
            for n in (1, 8):
                for name, run in systems.items():
                    samples[name, n].append(run(n))
                    print(f"round {round_ + 1}: {name}, {n} streams: {samples[name, n][-1]:.1f} tokens/s", flush=True)
                for name, fused in (("generate eager", eager), ("generate compiled", compiled)):
                    decode[name, n].append(decode_ms(fused, n, vocab))
    rows = [{"system": name, "streams": n, "tokens_per_s": statistics.median(v), "rounds": v,
             **({"decode_ms_per_token": statistics.median(decode[name, n])} if (name, n) in decode else {})}
            for (name, n), v in samples.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"prompt": PROMPT, "new_tokens": NEW, "weights": args.weights, "rows": rows}
    (args.out / "serve-engines.json").write_text(json.dumps(result, indent=2) + "\n")
    compiled_one = next(r["tokens_per_s"] for r in rows if r["system"] == "generate compiled" and r["streams"] == 1)
    lines = ["| system | streams | tokens/s (median) | ms per token per stream | decode step alone, ms per token | "
             "vs generate compiled, 1 stream |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        step = f"{r['decode_ms_per_token']:.1f}" if "decode_ms_per_token" in r else ""
        lines.append(f"| {r['system']} | {r['streams']} | {r['tokens_per_s']:.1f} | {1e3 * r['streams'] / r['tokens_per_s']:.1f} "
                     f"| {step} | {r['tokens_per_s'] / compiled_one:.2f}x |")
    (args.out / "serve-engines.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
