"""The slot engine eager against its decode steps compiled (`SlotEngine(compile=True)`), one process per
run (issue 43). SmolLM2-135M (embedded), float32, a bank of 8 random FFBA r = 8 adapters, 8 slots x 256
positions; 64-token prompts, 64 new tokens, greedy; `--streams` requests at once, each on its own adapter
(cycling through the 8). Three rounds per process, the first one (compiling) left out. Alternate the runs,
with the CPU to itself:

    for round in 1 2; do for c in 0 1; do for s in 1 8; do
      python benchmarks/serve_slots_compiled.py --compile $c --streams $s >> /tmp/slots.jsonl; done; done; done

(Run in one process next to transformers' engine and `generate` models, as `serve_engines.py` then ran its systems, the
compiled slot engine grew past 16 GB; alone it stays near 2 GB. Not understood yet, hence a process each.)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import fflora
from fflora.bench.serve import make_adapters
from fflora.serving import SlotEngine

PROMPT, NEW, ADAPTERS = 64, 64, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", type=int, choices=[0, 1], required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base, _ = fflora.load_base_model()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(base, Path(tmp), ADAPTERS, 8, 0)
        fused = fflora.FusedModel.build(base, max_adapters=ADAPTERS)
        for i, path in enumerate(paths):
            fused.load(f"a{i}", path)
    rates = []
    with SlotEngine(fused, slots=8, max_len=256, compile=bool(args.compile), eos_token_id=[]) as engine:
        for _ in range(args.rounds):
            start = time.perf_counter()
            ids = [engine.add_request(list(range(10 + i, 10 + i + PROMPT)), f"a{i % ADAPTERS}", max_new_tokens=NEW)
                   for i in range(args.streams)]
            tokens = sum(len(engine.wait(r).generated_tokens) for r in ids)
            rates.append(tokens / (time.perf_counter() - start))
    print(json.dumps({"compile": bool(args.compile), "streams": args.streams, "tokens_per_s_rounds": rates,
                      "tokens_per_s": statistics.median(rates[1:]),  # the first round compiles
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))


if __name__ == "__main__":
    main()
