"""What keeping an adapter's rows float32 costs and buys in the int8 and int4 weight formats (issue 42, item 3).

"before": the adapter's rows (its down-projections) quantized with the base rows (int8: a scale per row;
int4: groups of 32, in 64-row blocks of their own). "after": every format keeps them float32, beside the
base rows, as the adapter's columns already were. "final": what `fflora.ops.storage` keeps: int8 rows
quantized with their own scales (apart measured no better), int4 rows apart. This script measures one
code version:

  * next-token agreement of the fused FFBA model (SmolLM2-135M, r = 8, random adapter at each std) in
    each format with the float32 fused model, on the formats benchmark's fixed text (349 tokens); the
    fused base model's agreement is the floor rounding the base alone gives;
  * decode time per token (batch 1, greedy, eager and compiled) of fused FFBA in each format.

Run it for both versions, alternating, with the CPU to itself (the driver below does):

    git worktree add /tmp/fflora-old <commit before>
    for round in 1 2; do
      PYTHONPATH=/tmp/fflora-old/src python benchmarks/storage_cost.py --label before >> /tmp/storage.jsonl
      python benchmarks/storage_cost.py --label after >> /tmp/storage.jsonl
    done
    python benchmarks/storage_cost.py --summarize /tmp/storage.jsonl --out results/adapter-precision
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import fflora
from fflora.bench.formats import TEXT
from fflora.bench.latency import time_generation
from fflora.methods import adapter_parameters

FORMATS = ("float32", "int8", "int4")
STDS = (0.005, 0.02)


def build(std: float | None, weights: str):
    model, tokenizer = fflora.load_base_model()
    if std is not None:
        fflora.apply_adapter(model, fflora.FFBAConfig(r=8, alpha=16))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in adapter_parameters(model).values():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return fflora.fuse(model.eval(), weights=weights), tokenizer


@torch.no_grad()
def measure(label: str, new_tokens: int) -> dict:
    torch.manual_seed(0)
    out = {"label": label, "agreement": {}, "tpot_ms": {}}
    ids = None
    for std in (None, *STDS):
        reference = None
        for weights in FORMATS:
            model, tokenizer = build(std, weights)
            if ids is None:
                ids = tokenizer(TEXT, return_tensors="pt").input_ids
            argmax = model(ids).logits[0].argmax(-1)
            if weights == "float32":
                reference = argmax
            key = f"{'base' if std is None else f'ffba std {std}'}/{weights}"
            out["agreement"][key] = (argmax == reference).float().mean().item()
            if std == STDS[-1]:
                prompt = ids[:, :128]
                time_generation(model, prompt, 4)
                out["tpot_ms"][f"{weights}/eager"] = 1e3 * min(time_generation(model, prompt, new_tokens)[1] for _ in range(3))
                fflora.compile_decode(model)
                time_generation(model, prompt, new_tokens)  # compiles
                out["tpot_ms"][f"{weights}/compiled"] = 1e3 * min(time_generation(model, prompt, new_tokens)[1] for _ in range(3))
    return out


def summarize(path: Path, out_dir: Path) -> None:
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    labels = [label for label in ("before", "after", "final") if any(r["label"] == label for r in runs)]
    result = {"runs": runs, "median": {}}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        result["median"][label] = {
            "agreement": mine[0]["agreement"],  # deterministic: the same in every round
            "tpot_ms": {k: statistics.median(r["tpot_ms"][k] for r in mine) for k in mine[0]["tpot_ms"]},
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "storage-cost.json").write_text(json.dumps(result, indent=2) + "\n")
    before = result["median"].get("before")
    lines = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for key in result["median"][labels[-1]]["agreement"]:
        lines.append(f"| agreement {key} | " + " | ".join(f"{result['median'][lb]['agreement'][key]:.1%}" for lb in labels) + " |")
    for key in result["median"][labels[-1]]["tpot_ms"]:
        lines.append(f"| TPOT ms (median), FFBA std {STDS[-1]} {key} | "
                     + " | ".join(f"{result['median'][lb]['tpot_ms'][key]:.2f}" for lb in labels) + " |")
    lines += ["", "runs (alternating, one process each): "
              + ", ".join(f"{label} {sum(r['label'] == label for r in runs)}" for label in labels)]
    for label in labels[1:] if before is not None else []:
        mine = result["median"][label]["tpot_ms"]
        lines += ["", f"{label}/before TPOT: " + ", ".join(f"{k} {mine[k] / before['tpot_ms'][k]:.3f}" for k in mine)]
    (out_dir / "storage-cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--summarize", type=Path, help="a JSON-lines file of runs: write the table")
    parser.add_argument("--out", type=Path, default=Path("results/adapter-precision"))
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize, args.out)
    else:
        print(json.dumps(measure(args.label, args.new_tokens)))


if __name__ == "__main__":
    main()
