"""A/B of adapter methods on a user's own task: `fflora compare --methods ffba lora --data FILE ...`.

Every method trains on the same records with the same recipe and seed, at a matched budget (LoRA at
`lora_r`; FFBA and zFLoRA at the rank whose trainable-parameter count is closest to it), and in one
dtype: the first run's (`auto` is decided once per machine, `fflora.recipes.dtype.choose_dtype`),
given explicitly to every later run. Then, next to the untrained base model:

* the held-out NLL per response token (the records every run held out; float32);
* the decode latency of each method's inference form on its trained weights, measured interleaved
  in one process: FFBA and zFLoRA fused; LoRA merged into the base weights (its fastest form for one
  adapter) and unmerged (PEFT's form when adapters are swapped or mixed). With `compile`, each is
  compiled the way its users compile it (fflora's fast path; transformers' compile for LoRA).

Writes `compare.json` and `compare.md` to the output folder, each method's run in a subfolder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..bench.latency import bench_latency
from ..bench.settings import BenchSettings
from ..models.base_models import load_base_model
from ..recipes.artifacts import load_trained
from ..recipes.evaluate import response_loss
from ..recipes.settings import CompareSettings, TrainConfig
from ..recipes.train import CONFIG_FILE, held_out_records, train
from ..utils.files import atomic_write_text
from ..utils.sources import say

def run_compare(recipe: TrainConfig, settings: CompareSettings) -> dict:
    """Train each method of `settings` with `recipe` (its method and output_dir are replaced: one
    subfolder of recipe.output_dir per method; a finished run is reused), score and time them."""
    out = Path(recipe.output_dir)
    runs, dtype = {}, recipe.dtype
    for method in settings.methods:
        cfg = dataclasses.replace(recipe, method=method, output_dir=str(out / method), dtype=dtype,
                                  match_params=method != "lora")
        run_file = out / method / "run.json"
        if run_file.is_file():
            runs[method] = json.loads(run_file.read_text())
        else:
            say(f"compare: training {method} ({dtype})")
            runs[method] = train(cfg, resume=(out / method / CONFIG_FILE).is_file())
        dtype = runs[method]["dtype"]["dtype"]  # every later method trains in the first one's dtype
    held_out = held_out_records(recipe)  # the same records for every method: the recipe's data and dev size
    base, tokenizer = load_base_model(recipe.model)
    base_nll = response_loss(base, tokenizer, held_out, recipe.max_length, form=recipe.form) if held_out else None
    result = {"recipe": {k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("method", "output_dir")},
              "dtype": dtype, "held_out_records": len(held_out), "base": {"held_out_nll": base_nll},
              "methods": {m: {"trainable": r["parameters"]["trainable"], "dtype": r["dtype"]["dtype"],
                              "seconds_per_step": r["seconds_per_step"], "tokens_per_s": r["tokens_per_s"],
                              "train_loss": r["train_loss"], "held_out_nll": r.get("dev_loss"),
                              "rank": r["parameters"]["lora_r" if m == "lora" else "ffba_r"]}
                          for m, r in runs.items()},
              "settings": dataclasses.asdict(settings)}
    if settings.latency:
        result["latency"] = _latency(base, recipe, settings, out)
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "compare.md", format_compare(result) + "\n")
    return result


def _inference_forms(base, recipe: TrainConfig, settings: CompareSettings, out: Path) -> dict:
    """name -> model for the latency part: the base model, each fflora method fused, LoRA merged and
    unmerged; names follow `fflora.bench.latency` (its "_compiled" suffix compiles them there)."""
    suffix = "_compiled" if settings.compile else ""
    models = {"base" + suffix: base}
    for method in settings.methods:
        trained, _, _ = load_trained(out / method, recipe.model, fused=True)
        if method == "lora":
            models["lora_unmerged" + suffix] = trained.get_base_model() if settings.compile else trained
            trained, _, _ = load_trained(out / method, recipe.model)
            models["lora_merged" + suffix] = trained.merge_and_unload()
        else:
            models[f"{method}_fused" + suffix] = trained
    return models


@torch.no_grad()
def _latency(base, recipe: TrainConfig, settings: CompareSettings, out: Path) -> dict:
    models = _inference_forms(base, recipe, settings, out)
    bench = BenchSettings(prompt_len=settings.prompt_len, new_tokens=settings.new_tokens, batch_sizes=(1,),
                          repeats=settings.repeats, warmup=1)
    per = bench_latency(models, bench, base.config.vocab_size, plans={}, compile_s={})["1"]
    reference = per[next(iter(models))]["tpot"]["median"]
    return {name: {"ttft_ms": 1e3 * r["ttft"]["median"], "tpot_ms": 1e3 * r["tpot"]["median"],
                   "tpot_min_ms": 1e3 * r["tpot"]["min"], "tpot_max_ms": 1e3 * r["tpot"]["max"],
                   "tpot_over_base": r["tpot"]["median"] / reference} for name, r in per.items()}


def format_compare(result: dict) -> str:
    """The comparison as one markdown table: training, held-out NLL next to the base model, latency."""
    base_nll = result["base"]["held_out_nll"]
    lines = [f"Held-out NLL per response token on {result['held_out_records']} records every run held out (float32); "
             f"training in {result['dtype']} for every method.", "",
             "| method | rank | trainable | s/step | held-out NLL | vs base |", "|---|---:|---:|---:|---:|---:|",
             f"| base model (no training) | | 0 | | {_num(base_nll)} | |"]
    for method, m in result["methods"].items():
        gain = m["held_out_nll"] - base_nll if None not in (m["held_out_nll"], base_nll) else None
        lines.append(f"| {method} | {m['rank']} | {m['trainable']:,} | {m['seconds_per_step']:.2f} | "
                     f"{_num(m['held_out_nll'])} | {'' if gain is None else f'{gain:+.4f}'} |")
    if "latency" in result:
        s = result["settings"]
        lines += ["", f"Decode latency, batch 1, prompt {s['prompt_len']}, {s['new_tokens']} new tokens, greedy, "
                      f"median of {s['repeats']} interleaved rounds ({'compiled' if s['compile'] else 'eager'}):", "",
                  "| form | TTFT ms | TPOT ms (min-max) | TPOT / base |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.2f} ({r['tpot_min_ms']:.2f}-{r['tpot_max_ms']:.2f}) | "
                  f"{r['tpot_over_base']:.3f} |" for name, r in result["latency"].items()]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
