"""Why a large-norm FFBA adapter loses next-token agreement in the reduced weight formats (issue 42, item 3).

`fflora bench formats` found that with a random FFBA adapter at std 0.02 (a larger norm than a short
training gives) the fused model's next-token agreement with the float32 fused model falls to 94%
(bfloat16), 81% (int8) and 67% (int4), where the base model alone keeps 98.6-99.7%. Is it the
adapter's rows and columns being quantized with the base, or something else?

Each variant below perturbs one thing of the float32 training form (which equals the fused form, to
1e-4) and scores next-token agreement with it on the formats benchmark's fixed text (349 tokens):
the base weights rounded to a format (the adapter exact), the adapter's rows (its down-projections)
or columns (its up-projections) rounded (the base exact), all of them, and bfloat16 activations
(autocast). The same perturbations of the base model alone
give the reference. It also reports how close the adapted model's top two logits are (the share of
positions whose margin is under 0.1 and 0.5 nats): a flat top makes any perturbation flip the argmax.

    python benchmarks/adapter_precision.py --out results/adapter-precision
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

import fflora
from fflora.bench.formats import TEXT
from fflora.methods import adapter_parameters
from fflora.ops.int4 import quantize_groups
from fflora.ops.int8 import dequantize_rows, quantize_rows

ROUND = {
    "bfloat16": lambda w: w.to(torch.bfloat16).float(),
    "int8": lambda w: dequantize_rows(*quantize_rows(w)),  # one scale per row, as the int8 format
    "int4": lambda w: _int4(w),  # groups of 32 along the input, as the int4 format
}


def _int4(weight: torch.Tensor) -> torch.Tensor:
    cols = weight.shape[1]
    if cols % 32:
        weight = torch.nn.functional.pad(weight, (0, 32 - cols % 32))
    q, scales_zeros = quantize_groups(weight)
    scale, zero = scales_zeros[..., 0].t().float(), scales_zeros[..., 1].t().float()
    grouped = q.float().view(q.shape[0], -1, 32)
    return ((grouped - 8) * scale[..., None] + zero[..., None]).view(q.shape)[:, :cols]


@torch.no_grad()
def _logits(model, ids, autocast: bool = False) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        return model(input_ids=ids).logits[0].float()


@contextlib.contextmanager
def _rounded(tensors: list[torch.Tensor], fmt: str):
    """`tensors` rounded to `fmt` in place for the block, restored after."""
    saved = [t.clone() for t in tensors]
    for t in tensors:
        t.copy_(ROUND[fmt](t.float()).to(t.dtype))
    try:
        yield
    finally:
        for t, s in zip(tensors, saved):
            t.copy_(s)


def _margins(logits: torch.Tensor) -> dict:
    top = logits.log_softmax(-1).topk(2, dim=-1).values
    margin = top[:, 0] - top[:, 1]
    return {"under_0.1": (margin < 0.1).float().mean().item(), "under_0.5": (margin < 0.5).float().mean().item(),
            "median": margin.median().item()}


def measure(model, ids, base: list[torch.Tensor], rows: list[torch.Tensor] = (), cols: list[torch.Tensor] = ()) -> dict:
    """Agreement with the float32 model when `base` (the GEMM weights), the adapter's `rows` (its
    down-projections: rows of the fused GEMMs, quantized with them in int8 / int4) or its `cols` (its
    up-projections: a dense block beside the fused GEMMs in those formats) are rounded to each format."""
    reference = _logits(model, ids)
    argmax = reference.argmax(-1)
    out = {"margins": _margins(reference), "agreement": {}}
    rows, cols = list(rows), list(cols)
    for fmt in ROUND:
        for what, tensors in (("base", base), ("adapter rows", rows), ("adapter columns", cols),
                              ("all", base + rows + cols)):
            if not tensors:
                continue
            with _rounded(tensors, fmt):
                out["agreement"][f"{fmt} {what}"] = (_logits(model, ids).argmax(-1) == argmax).float().mean().item()
    out["agreement"]["bfloat16 activations"] = (_logits(model, ids, autocast=True).argmax(-1) == argmax).float().mean().item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results/adapter-precision")
    parser.add_argument("--stds", type=float, nargs="+", default=[0.002, 0.005, 0.02])
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    model, tokenizer = fflora.load_base_model()
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :512]
    # the GEMM weights a fused format rounds: every adapted projection's (and the LM head's)
    base = [m.weight.data for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    result = {"model": "SmolLM2-135M-Instruct", "tokens": ids.shape[1], "rank": args.rank,
              "base model": measure(model, ids, base)}
    fflora.apply_ffba(model, fflora.FFBAConfig(r=args.rank, alpha=2 * args.rank))
    named = adapter_parameters(model)
    params = list(named.values())
    gen = torch.Generator().manual_seed(0)
    for std in args.stds:
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        result[f"FFBA std {std}"] = measure(model, ids, base, [p.data for k, p in named.items() if k.endswith("_down")],
                                            [p.data for k, p in named.items() if k.endswith("_up")])
        print(std, json.dumps(result[f"FFBA std {std}"]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter-precision.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "adapter-precision.md").write_text(format_table(result) + "\n")
    print(format_table(result))


def format_table(result: dict) -> str:
    rows = [k for k in result if k == "base model" or k.startswith("FFBA")]
    keys = list(result[rows[-1]]["agreement"])
    lines = [f"Next-token agreement with the float32 model on {result['tokens']} tokens (SmolLM2-135M, FFBA r = "
             f"{result['rank']} random at each std), one thing rounded at a time; the top-2 log-prob margin:", "",
             "| model | margin median | margin < 0.1 | " + " | ".join(keys) + " |",
             "|---|---:|---:|" + "---:|" * len(keys)]
    for row in rows:
        r = result[row]
        lines.append(f"| {row} | {r['margins']['median']:.2f} | {r['margins']['under_0.1']:.1%} | "
                     + " | ".join(f"{r['agreement'][k]:.1%}" if k in r["agreement"] else "" for k in keys) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
