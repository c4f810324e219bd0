"""The NLL scorers' attention: packed rows through `packed_attention` (each example's own causal SDPA
call) against transformers' SDPA with the packed row's block-diagonal mask as a dense one (what
`example_nll` ran before). Same numbers, how long each takes.

The math study's rationale NLL on the first `--limit` GSM8K and SVAMP test items (instruction form,
16 examples a packed row, float32), the two attentions in turn `--rounds` times on one model; per item
the largest difference of the NLL per token. Run it with the CPU to itself:

    python benchmarks/packed_nll.py --limit 64 --out results/packed-nll
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fflora.models.base_models import load_base_model
from fflora.recipes.data import load_split
from fflora.recipes.evaluate import gold_nll
from fflora.utils.files import atomic_write_text

# transformers' SDPA under another name: `example_nll` switches only "sdpa" to packed attention
DENSE = "dense_block_diagonal_sdpa"
AttentionInterface.register(DENSE, sdpa_attention_forward)
AttentionMaskInterface.register(DENSE, sdpa_mask)
ATTENTIONS = {"dense mask": DENSE, "packed": "sdpa"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=64, help="first N test items of GSM8K and of SVAMP")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="results/packed-nll")
    args = parser.parse_args()
    model, tokenizer = load_base_model()  # attention is the same code with an adapter or without
    records = [r for task in ("gsm8k", "svamp") for r in load_split(task, "test")[: args.limit]]
    seconds = {name: [] for name in ATTENTIONS}
    nll, tokens = {}, 0
    for _ in range(args.rounds):
        for name, implementation in ATTENTIONS.items():
            model.config._attn_implementation = implementation
            begun = time.perf_counter()
            rows = gold_nll(model, tokenizer, records, "instruction", 1024, 16)
            seconds[name].append(time.perf_counter() - begun)
            nll[name], tokens = [row["nll"] for row in rows], sum(row["tokens"] for row in rows)
    model.config._attn_implementation = "sdpa"
    differences = [abs(a - b) for a, b in zip(nll["dense mask"], nll["packed"])]
    speedup = min(seconds["dense mask"]) / min(seconds["packed"])
    atomic_write_text(Path(args.out) / f"base-model-{args.limit}.json", json.dumps(
        {"model": "base", "items": len(records), "batch_size": 16, "scored_tokens": tokens,
         "largest_nll_difference": max(differences),
         "mean_nll": {name: sum(values) / len(values) for name, values in nll.items()},
         "seconds": seconds, "speedup": speedup}, indent=1) + "\n")
    print(f"{len(records)} items, largest NLL difference {max(differences):.2e}; dense mask "
          f"{min(seconds['dense mask']):.1f} s, packed {min(seconds['packed']):.1f} s ({speedup:.2f}x)")


if __name__ == "__main__":
    main()
