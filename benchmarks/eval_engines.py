"""Greedy evaluation on transformers' `generate` against fflora's slot engine: the same answers, and how long
each takes (`fflora eval --engine`, the math study's exact-match row).

A fresh model per engine (the slot engine fuses the model in place), the study's settings (16 prompts a
batch or 16 slots, 160 new tokens, the first `--limit` items of AddSub, MultiArith and SingleEq), the
engines in turn `--rounds` times; the outputs compared text for text. Run it with the CPU to itself:

    python benchmarks/eval_engines.py --limit 48 --out results/eval-engines
    python benchmarks/eval_engines.py --adapter runs/study-math/sweep-ffba-lr0.0003-seed0 --limit 48 --out ...
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fflora.models.base_models import load_base_model
from fflora.recipes.artifacts import load_trained
from fflora.recipes.evaluate import evaluate
from fflora.recipes.settings import ENGINES
from fflora.utils.files import atomic_write_text, read_jsonl

TASKS = ["addsub", "multiarith", "singleeq"]


def timed_outputs(adapter: str | None, engine: str, limit: int, folder: Path) -> tuple[float, list[str], float]:
    """(seconds, every output text in order, mean exact match) of one evaluation on a freshly loaded model."""
    model, tokenizer = load_trained(adapter)[:2] if adapter else load_base_model()
    output = folder / f"{engine}.json"
    begun = time.perf_counter()
    summary = evaluate(model, tokenizer, TASKS, limit=limit, batch_size=16, max_new_tokens=160, engine=engine,
                       output=output)
    seconds = time.perf_counter() - begun
    return seconds, [row["output"] for row in read_jsonl(output.with_suffix(".predictions.jsonl"))], summary["average"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="a run folder of `fflora train` (default: the base model)")
    parser.add_argument("--limit", type=int, default=48, help="first N items of each set")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default="results/eval-engines")
    args = parser.parse_args()
    rounds = {engine: [] for engine in ENGINES}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.rounds):
            for engine in ENGINES:
                rounds[engine].append(timed_outputs(args.adapter, engine, args.limit, Path(scratch)))
    texts = {engine: runs[0][1] for engine, runs in rounds.items()}
    same = sum(a == b for a, b in zip(texts["transformers"], texts["slots"]))
    seconds = {engine: [run[0] for run in runs] for engine, runs in rounds.items()}
    result = {"model": args.adapter or "base", "tasks": TASKS, "limit": args.limit, "items": len(texts["slots"]),
              "identical_outputs": same, "exact_match": {e: runs[0][2] for e, runs in rounds.items()},
              "seconds": seconds, "speedup": min(seconds["transformers"]) / min(seconds["slots"])}
    name = Path(args.adapter).name if args.adapter else "base-model"
    atomic_write_text(Path(args.out) / f"{name}-{args.limit}.json", json.dumps(result, indent=1) + "\n")
    print(f"{name}: {same} of {result['items']} outputs identical; transformers {min(seconds['transformers']):.1f} s, "
          f"slots {min(seconds['slots']):.1f} s ({result['speedup']:.2f}x)")


if __name__ == "__main__":
    main()
