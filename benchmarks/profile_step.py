"""Where the time of one decode step goes: torch.profiler over compiled decode steps of the fused base and
FFBA fused in a weight format, the embedded model, batch 1, grouped by kind of work.

    python benchmarks/profile_step.py [--weights int4] [--adapter runs/formats-ffba/adapter] [--out results/profile-step]

Inductor's generated kernels are profiled one by one (`cpp.enable_kernel_profile`), so the groups are:
the weight GEMMs (PyTorch's int4 / int8 kernels, or mm for float weights), the adapter columns' small
float32 products (mm, for a quantized FFBA model), attention, inductor's fused element-wise kernels
(norms, rotary, SiLU * up, residual adds, FFBA's concatenations and slices), and the rest. Compare
the two models' groups per step to see what FFBA adds, and the whole step with the bytes it reads.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch._inductor import config as inductor_config
from transformers import StaticCache

import fflora
from fflora.bench.formats import weight_bytes
from fflora.fastpath.compile import decode_step

GROUPS = (("weight GEMM", ("_weight_int4pack_mm", "_weight_int8pack_mm", "aten::linear", "aten::addmm")),
          ("adapter columns (float32 mm)", ("aten::mm",)),
          ("attention", ("scaled_dot_product", "attention")),
          ("inductor fused kernels", ("cpp_fused", "cpp_cpu")),
          ("cache update", ("index_copy", "index_put")))


def group_of(name: str) -> str:
    return next((group for group, keys in GROUPS if any(k in name for k in keys)), "other")


@torch.no_grad()
def profile(model, ids: torch.Tensor, steps: int) -> dict:
    """Self CPU time per op name and per group, per decode step, of `steps` compiled steps after a prefill."""
    fflora.compile_decode(model)
    step = decode_step(model)
    prompt = ids.shape[1]

    def decode(cache, token, start, count):
        for i in range(count):
            out = step(input_ids=token, cache=cache, use_cache=True, cache_position=torch.tensor([start + i]))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return token

    for _ in range(2):  # compile, then warm
        cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 4)
        token = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        decode(cache, token, prompt, 3)
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 4)
    token = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        decode(cache, token, prompt, steps)
    ops, groups = {}, defaultdict(float)
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / steps
        if ms > 0:
            ops[event.key] = {"ms_per_step": ms, "calls_per_step": event.count / steps}
            groups[group_of(event.key)] += ms
    total = sum(groups.values())
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1]["ms_per_step"])[:12])
    return {"ms_per_step": total, "groups_ms": dict(groups), "top_ops": top, "weight_bytes": weight_bytes(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="int4", choices=["float32", "bfloat16", "int8", "int4"])
    parser.add_argument("--adapter", default=None, help="a trained FFBA adapter (default: a random one, r=8)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", default="results/profile-step")
    args = parser.parse_args()
    inductor_config.cpp.enable_kernel_profile = True
    results, ids = {}, None
    for kind in ("fused_base", "ffba_fused"):
        model, _ = fflora.load_base_model()
        if ids is None:  # the same prompt for both
            ids = torch.randint(10, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
        if kind == "ffba_fused":
            if args.adapter:
                fflora.load_adapter(model, args.adapter, strict=True)
            else:
                fflora.apply_adapter(model, fflora.FFBAConfig(r=8, alpha=16))
                gen = torch.Generator().manual_seed(0)
                for p in (p for p in model.parameters() if p.requires_grad):
                    p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        fflora.fuse(model, weights=args.weights).eval()
        fflora.plan_gemms(model, "auto", rows=(1,))
        results[kind] = profile(model, ids, args.steps)
        torch._dynamo.reset()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"weights": args.weights, "adapter": args.adapter, "steps": args.steps, "threads": torch.get_num_threads(),
               "models": results}
    (out / f"profile-{args.weights}.json").write_text(json.dumps(payload, indent=2) + "\n")
    groups = sorted({g for r in results.values() for g in r["groups_ms"]})
    lines = [f"Profile of one compiled decode step, {args.weights}, batch 1, {torch.get_num_threads()} threads "
             f"(ms of self CPU time per step, mean of {args.steps} steps)", "",
             "| group | fused_base | ffba_fused | FFBA adds |", "|---|---:|---:|---:|"]
    for g in groups:
        a, b = (results[k]["groups_ms"].get(g, 0.0) for k in ("fused_base", "ffba_fused"))
        lines.append(f"| {g} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    a, b = results["fused_base"]["ms_per_step"], results["ffba_fused"]["ms_per_step"]
    lines.append(f"| **step** | **{a:.2f}** | **{b:.2f}** | **{b - a:+.2f}** |")
    for kind, r in results.items():
        lines += ["", f"{kind}: top ops", "", "| op | ms/step | calls/step |", "|---|---:|---:|"]
        lines += [f"| {name[:70]} | {v['ms_per_step']:.3f} | {v['calls_per_step']:.0f} |" for name, v in r["top_ops"].items()]
    (out / f"profile-{args.weights}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
