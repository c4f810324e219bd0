"""Latency benchmark: base, fused base, LoRA (unmerged, merged), FFBA and zFLoRA (unfused, fused),
and the fused ones again on the decode fast path (`fflora.fastpath`): GEMM plan (suffix "_fast"),
GEMM plan and compiled decode step (suffix "_compiled"); and the peers at their best settings, the
stock model and PEFT's unmerged LoRA compiled the way transformers compiles them (`base_compiled`,
`lora_unmerged_compiled`: static cache, `generation_config.compile_config`, the same inductor settings).

All configurations live in one process and are measured interleaved (A B C ... A B C ...) after a
warm-up, so machine noise hits them alike; compare them by their ratios to the base model, not by
absolute times across runs. Per configuration:

* TTFT: one prefill forward pass over the prompt batch (time to first token);
* TPOT: the mean time of each following greedy decode step with the KV cache;
* roofline: weight bytes read per decode step / TPOT, against the memory bandwidth of a large
  tensor copy measured in the same run (decode at small batch is bandwidth-bound);
* weight memory: bytes of the distinct tensors the configuration holds.

Also: the training-step time of FFBA, zFLoRA and LoRA, and the time to switch the active adapter
(FFBA / zFLoRA fused: rewrite its rows/columns in place; LoRA merged: unmerge, load, merge).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..fastpath.compile import compile_generation, decode_step, is_compiled
from ..methods import adapter_state_dict, apply_adapter, compile_decode, fuse, load_adapter_state, plan_gemms, registry
from ..models.footprint import release_memory, tensor_bytes
from ..recipes.budget import LORA_TARGETS, lora_parameter_count, match_lora_rank
from ..utils.method_names import DEFAULT_METHOD, method_names
from ..utils.sources import say
from .settings import CONFIGS, BenchSettings

EAGER_CONFIGS = tuple(c for c in CONFIGS if not c.endswith("_compiled"))  # no compile warm-up (tens of seconds each)
# compiled as their users do: no fflora GEMM plan (merged LoRA: `fflora compare --compile`)
COMPILED_PEERS = ("base_compiled", "lora_unmerged_compiled", "lora_merged_compiled")
FAST_PATH = ("_fast", "_compiled")  # suffixes of fflora's configurations planned per batch size
# The latency targets (issue 9): TPOT of a configuration over TPOT of another, at most `limit`.
TARGETS = (("fused_base", "base", 1.00), ("ffba_fused", "fused_base", 1.03), ("zflora_fused", "fused_base", 1.02),
           ("ffba_fused_fast", "base", 0.85), ("ffba_fused_fast", "lora_unmerged", 0.75),
           ("ffba_fused_compiled", "base", 0.85), ("ffba_fused_compiled", "lora_unmerged", 0.75),
           # against the peers at their best (issue 32): FFBA fused <= 0.80x PEFT LoRA unmerged, both compiled
           ("ffba_fused_compiled", "lora_unmerged_compiled", 0.80), ("zflora_fused_compiled", "lora_unmerged_compiled", 0.80))


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (one read + one write of every byte), best of repeats."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def _randomize(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Non-zero trainable (adapter) weights, so adapters are not skipped as zero work."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _adapted(model: nn.Module, family: str, rank: int) -> nn.Module:
    """`model` with a fresh adapter of method `family` ("ffba", "zflora") of rank `rank`."""
    return apply_adapter(model, registry.make_config(family, r=rank, alpha=2 * rank))


def _lora(model: nn.Module, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS))


def budget_of(hf_config, settings: BenchSettings) -> dict:
    """Every fflora method's trainable-parameter count at the benchmark's rank ("<method>_params"), next to
    LoRA's at the rank whose budget is closest to the default method's ("ffba_rank": that rank)."""
    configs = {m.name: registry.make_config(m.name, r=settings.rank) for m in registry.METHODS}
    lora_rank = settings.lora_rank or match_lora_rank(hf_config, configs[DEFAULT_METHOD])
    return {f"{DEFAULT_METHOD}_rank": settings.rank,
            **{f"{m.name}_params": m.parameter_count(hf_config, configs[m.name]) for m in registry.METHODS},
            "lora_rank": lora_rank, "lora_params": lora_parameter_count(hf_config, lora_rank)}


# Configurations that never write the base weights they hold: their copies share `base`'s tensors
# (fusing builds new tensors; PEFT's unmerged LoRA and the training forms wrap the modules). Merged
# LoRA adds into its seven projections (copied, the rest shared), and the fast path re-lays tensors out
# (the LM head included), so those get their own. SmolLM2's 538 MB then counts once for these seven,
# not seven times.
SHARES_BASE_WEIGHTS = ("base", "fused_base", "lora_unmerged", *(f"{m}_{form}" for m in method_names()
                                                                 for form in ("unfused", "fused")))


def sharing_copy(base: nn.Module, writes: tuple[str, ...] = ()) -> nn.Module:
    """A copy of `base` that holds `base`'s own tensors, but those of the modules whose names end with one
    of `writes` (copies: the form writes into them, as merging LoRA does)."""
    written = {id(t) for name, module in base.named_modules() if writes and name.endswith(tuple(writes))
               for t in module.parameters(recurse=False)}
    return copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()] if id(t) not in written})


def build_configs(base: nn.Module, settings: BenchSettings, lora_rank: int) -> dict[str, nn.Module]:
    """The benchmark's models, each a copy of `base` (which stays untouched; see SHARES_BASE_WEIGHTS for
    the ones that share its tensors); the "_fast" and "_compiled" ones get their GEMM plan (and compiled
    step) per batch size in `bench_latency`. The compiled LoRA is the transformers model with PEFT's
    layers inside (what `generate` compiles)."""
    models = {}
    for name in settings.configs:
        if name in SHARES_BASE_WEIGHTS or name == "lora_merged":
            model = sharing_copy(base, writes=LORA_TARGETS if name == "lora_merged" else ())
        else:
            model = copy.deepcopy(base)
        name_ = name.removesuffix("_fast").removesuffix("_compiled")
        if name_ == "fused_base":
            fuse(model)
        elif name.startswith("lora"):
            model = _lora(model, lora_rank)
            _randomize(model, settings.seed)
            if name == "lora_merged":
                model = model.merge_and_unload()
            elif name == "lora_unmerged_compiled":
                model = model.get_base_model()
        elif name_.split("_")[0] in method_names():
            family, form = name_.split("_")
            _randomize(_adapted(model, family, settings.rank), settings.seed)
            if form == "fused":
                fuse(model)
        models[name] = model.eval()
    return models


@torch.no_grad()
def time_generation(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(TTFT, TPOT) in seconds of greedy decoding with the KV cache. A model with a compiled decode
    step decodes as `generate` does then: static cache, eager prefill, compiled steps."""
    from transformers import DynamicCache, StaticCache

    compiled = is_compiled(model)
    prompt_len = input_ids.shape[1]
    if compiled:
        cache, step = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens), decode_step(model)
    else:
        cache, step = DynamicCache(config=model.config), model
    start = time.perf_counter()
    logits = model(input_ids=input_ids, cache=cache, use_cache=True).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(new_tokens - 1):
        position = {"cache_position": torch.tensor([prompt_len + i])} if compiled else {}
        token = step(input_ids=token, cache=cache, use_cache=True, **position).logits[:, -1].argmax(-1, keepdim=True)
    tpot = (time.perf_counter() - start) / max(new_tokens - 1, 1)
    return ttft, tpot


def _median_spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def bench_latency(models: dict[str, nn.Module], settings: BenchSettings, vocab: int, plans: dict,
                  compile_s: dict) -> dict:
    """TTFT/TPOT per batch size and configuration, measured interleaved. Before each batch size fflora's
    "_fast" and "_compiled" models are planned for it (`plans[name][batch]`: what `plan_gemms` chose),
    and every "_compiled" one compiled for it (`compile_s[name][batch]`: the warm-up cost)."""
    results = {}
    for batch in settings.batch_sizes:
        gen = torch.Generator().manual_seed(settings.seed)
        ids = torch.randint(10, vocab, (batch, settings.prompt_len), generator=gen)
        for name, model in models.items():
            if name.endswith(FAST_PATH) and name not in COMPILED_PEERS:
                say(f"GEMM plan of {name} for batch {batch}")
                plans.setdefault(name, {})[str(batch)] = plan_gemms(model, settings.gemm_plan, rows=(batch,))
            if name.endswith("_compiled"):
                say(f"compiling the decode step of {name} for batch {batch}")
                start = time.perf_counter()
                compile = compile_generation if name in COMPILED_PEERS else compile_decode
                compile(model, freezing=settings.compile_freezing)
                time_generation(model, ids, settings.new_tokens)  # compiles
                compile_s.setdefault(name, {})[str(batch)] = time.perf_counter() - start
        samples = {name: {"ttft": [], "tpot": []} for name in models}
        total = settings.warmup + settings.repeats
        for round_ in range(total):
            say(f"latency batch {batch}: round {round_ + 1}/{total}" + (" (warm-up)" if round_ < settings.warmup else ""))
            for name, model in models.items():
                ttft, tpot = time_generation(model, ids, settings.new_tokens)
                if round_ >= settings.warmup:
                    samples[name]["ttft"].append(ttft)
                    samples[name]["tpot"].append(tpot)
        results[str(batch)] = {name: {k: _median_spread(v) for k, v in s.items()} for name, s in samples.items()}
    return results


def bench_training(base: nn.Module, settings: BenchSettings, lora_rank: int) -> dict:
    """Median seconds per optimizer step (forward, backward, AdamW) of every fflora method and LoRA
    (training forms: their base weights frozen, held once, `base`'s own)."""
    gen = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(10, base.config.vocab_size, (settings.train_batch, settings.train_len), generator=gen)
    models = {**{m: _adapted(sharing_copy(base), m, settings.rank) for m in method_names()},
              "lora": _lora(sharing_copy(base), lora_rank)}
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    times = {k: [] for k in models}
    for step in range(settings.train_steps + 1):  # the first step warms up
        for name, model in models.items():
            model.train()
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step:
                times[name].append(time.perf_counter() - start)
    return {name: _median_spread(t) for name, t in times.items()}


@torch.no_grad()
def bench_fused_switch(models: dict[str, nn.Module], repeats: int = 3) -> dict:
    """Seconds to make another adapter active in each fflora method's fused form (in place)."""
    results = {}
    for name in (f"{m}_fused" for m in method_names()):
        fused = models.get(name)
        if fused is None:
            continue
        states = [adapter_state_dict(fused)]
        states.append({k: torch.randn_like(v) * 0.02 for k, v in states[0].items()})
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            load_adapter_state(fused, states[(i + 1) % 2])
            times.append(time.perf_counter() - start)
        results[name] = _median_spread(times)
    return results


@torch.no_grad()
def bench_lora_switch(base: nn.Module, settings: BenchSettings, lora_rank: int, repeats: int = 3) -> dict:
    """Seconds to make another LoRA adapter active in its merged form (unmerge, load, merge), on a copy of
    `base` (merging writes the weights)."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    lora = _lora(sharing_copy(base, writes=LORA_TARGETS), lora_rank)
    _randomize(lora, settings.seed)
    states = [get_peft_model_state_dict(lora)]
    states.append({k: torch.randn_like(v) * 0.02 for k, v in states[0].items()})
    lora.merge_adapter()
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        lora.unmerge_adapter()
        set_peft_model_state_dict(lora, states[(i + 1) % 2])
        lora.merge_adapter()
        times.append(time.perf_counter() - start)
    return {"lora_merged": _median_spread(times)}


def run_bench(base: nn.Module, settings: BenchSettings) -> dict:
    """Every measurement of the benchmark, as one JSON-ready dict."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    budget = budget_of(base.config, settings)
    say("measuring memory bandwidth (large tensor copy)")
    bandwidth = memory_bandwidth()  # before the configurations: its 1 GB and theirs are never held together
    say("building the configurations")
    models = build_configs(base, settings, budget["lora_rank"])
    release_memory()  # the copies' and fusing's temporaries
    plans: dict[str, dict] = {}
    compile_s: dict[str, dict] = {}
    latency = bench_latency(models, settings, base.config.vocab_size, plans, compile_s)
    weights = {name: tensor_bytes(m) for name, m in models.items()}
    for per_batch in latency.values():
        for name, r in per_batch.items():
            r["weight_bytes"] = weights[name]
            r["achieved_bytes_per_s"] = weights[name] / r["tpot"]["median"]
            r["fraction_of_copy_bandwidth"] = r["achieved_bytes_per_s"] / bandwidth
    targets = {batch: check_targets(per) for batch, per in latency.items()}
    say("timing adapter switches")
    switch = bench_fused_switch(models)
    del models  # the inference forms, before LoRA's merged copy and the training forms are built
    release_memory()
    if "base" in settings.configs:
        switch |= bench_lora_switch(base, settings, budget["lora_rank"])
    release_memory()
    say("timing training steps")
    training = bench_training(base, settings, budget["lora_rank"])
    return {
        "model": getattr(base.config, "_name_or_path", None),
        "settings": asdict(settings),
        "budget": budget,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "copy_bandwidth_bytes_per_s": bandwidth,
        "latency": latency,
        "targets": targets,
        "adapter_switch_s": switch,
        "fast_path_plans": plans,
        "compile_s": compile_s,
        "train_step_s": training,
    }


def check_targets(per: dict) -> dict:
    """Each target of `TARGETS` whose two configurations were measured: "a / b" -> ratio of median
    TPOTs, its limit, and whether it is met."""
    tpot = {name: r["tpot"]["median"] for name, r in per.items()}
    return {f"{a} / {b}": {"ratio": tpot[a] / tpot[b], "limit": limit, "met": tpot[a] / tpot[b] <= limit}
            for a, b, limit in TARGETS if a in tpot and b in tpot}


def format_bench_table(result: dict) -> str:
    """Markdown tables: latency per batch size with ratios to base, then training and switch times."""
    lines = []
    for batch, per in result["latency"].items():
        base = per.get("base")
        lines += [f"**batch {batch}**, prompt {result['settings']['prompt_len']}, "
                  f"{result['settings']['new_tokens']} new tokens, {result['threads']} threads", "",
                  "| configuration | TTFT ms | TPOT ms (min-max) | TPOT / base | weights MB | GB/s | of copy BW |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in per.items():
            tpot = r["tpot"]
            ratio = f"{tpot['median'] / base['tpot']['median']:.3f}" if base else "-"
            lines.append(
                f"| {name} | {1e3 * r['ttft']['median']:.1f} | {1e3 * tpot['median']:.2f} "
                f"({1e3 * tpot['min']:.2f}-{1e3 * tpot['max']:.2f}) | {ratio} | {r['weight_bytes'] / 1e6:.0f} | "
                f"{r['achieved_bytes_per_s'] / 1e9:.1f} | {100 * r['fraction_of_copy_bandwidth']:.0f}% |")
        targets = result.get("targets", {}).get(batch)
        if targets:
            lines.append("\nTargets (TPOT ratios): " + "; ".join(
                f"{name} = {t['ratio']:.3f} (<= {t['limit']:.2f}: {'met' if t['met'] else 'NOT met'})"
                for name, t in targets.items()) + ".")
        lines.append("")
    for name, per_batch in result.get("fast_path_plans", {}).items():
        for batch, report in per_batch.items():
            chosen = [(p["layout"], order) for p in report["plans"].values() for order in p["orders"].values() or ["xw"]]
            kinds = sorted(set(chosen))
            lines.append(f"{name}, batch {batch}: GEMM plan {report['mode']} ({report['seconds']:.1f} s to set up): "
                         + ", ".join(f"{layout} weights / {order} for {chosen.count((layout, order))}" for layout, order in kinds)
                         + f" of {len(chosen)} weight shapes.")
    for name, per_batch in result.get("compile_s", {}).items():
        lines.append(f"{name}: compiled in " + ", ".join(f"{s:.1f} s (batch {b})" for b, s in per_batch.items()) + ".")
    budget = result["budget"]
    lines += ["", "".join(f"{m.title} r={result['settings']['rank']}: {budget[m.name + '_params']:,} trainable parameters; "
                          for m in registry.METHODS)
              + f"LoRA r={budget['lora_rank']}: {budget['lora_params']:,}. "
              f"Copy bandwidth {result['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s.", ""]
    train = result["train_step_s"]
    lines += ["| training step (median s) | " + " | ".join(train) + " | "
              + " | ".join(f"{m.title} / LoRA" for m in registry.METHODS) + " |",
              "|---|" + "---:|" * (len(train) + len(registry.METHODS)),
              f"| batch {result['settings']['train_batch']} x {result['settings']['train_len']} | "
              + " | ".join(f"{t['median']:.3f}" for t in train.values())
              + "".join(f" | {train[m.name]['median'] / train['lora']['median']:.3f}" for m in registry.METHODS) + " |", ""]
    switch = result["adapter_switch_s"]
    if switch:
        lines += ["| adapter switch (median ms) | " + " | ".join(switch) + " |",
                  "|---|" + "---:|" * len(switch),
                  "| | " + " | ".join(f"{1e3 * v['median']:.1f}" for v in switch.values()) + " |"]
    return "\n".join(lines)


def plot_bench(result: dict, path: Path) -> None:
    """A bar chart of TPOT per configuration and batch size, relative to the base model's median, with
    the min-max spread of the configuration's runs as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(result["latency"])
    names = list(result["latency"][batches[0]])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(batches)
    for i, batch in enumerate(batches):
        per = result["latency"][batch]
        ref = per["base"]["tpot"]["median"]
        ratios = [per[n]["tpot"]["median"] / ref for n in names]
        spread = [[r - per[n]["tpot"]["min"] / ref for n, r in zip(names, ratios)],
                  [per[n]["tpot"]["max"] / ref - r for n, r in zip(names, ratios)]]
        bars = ax.bar([x + i * width for x in range(len(names))], ratios, width, yerr=spread, capsize=2,
                      label=f"batch {batch}")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks([x + width * (len(batches) - 1) / 2 for x in range(len(names))], names, rotation=25)
    ax.set_ylabel("time per output token / base")
    ax.set_title(f"decode latency relative to the base model ({result['model']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: dict, out_dir: Path, stem: str, table, plot) -> Path:
    """{stem}.json, {stem}.md (`table(result)`) and {stem}.png (`plot(result, path)`) in out_dir; returns the folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(table(result) + "\n")
    plot(result, out_dir / f"{stem}.png")
    return out_dir


def write_bench(result: dict, out_dir: Path) -> Path:
    """bench.json, bench.md and bench.png in out_dir; returns the folder."""
    return write_results(result, out_dir, "bench", format_bench_table, plot_bench)
