"""Multi-adapter decode benchmark: the fused adapter bank against what users serve adapters with.

Per decode step (greedy, KV cache) of a batch whose rows name adapters, for every batch size,
adapter mix and number of resident adapters K, four methods are measured interleaved in one
process (compare them by ratios within a cell, never across runs):

* fused_base:  the fused base model, no adapter (the floor);
* bank:        FFBA adapters in the fused bank, `adapter_names=` per row (`fflora.methods.ffba.bank`);
* peft_mixed:  PEFT LoRA with K adapters loaded, `adapter_names=` per row (PEFT's mixed batch:
               per projection, one extra pair of GEMMs per adapter present in the batch);
* gather_lora: LoRA as vLLM's torch-native path runs it on CPU: per projection, gather each
               row's A and B from the stacked adapters, then two batched einsums.

LoRA's rank is matched to FFBA's parameter budget (`fflora.recipes.budget`). Adapter mixes follow
Punica's patterns: identical (one adapter for every row), uniform, zipf (power law, alpha 1.5)
and distinct (row i uses adapter i mod K).
"""

from __future__ import annotations

import contextlib
import copy
import random
import statistics
import time
from contextvars import ContextVar
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from ..methods import FFBAConfig, FusedModel, adapter_state_dict, apply_adapter, fuse
from ..recipes.budget import LORA_TARGETS, match_lora_rank
from ..utils.sources import say
from .latency import _median_spread, _randomize, write_results
from .settings import MIXES, BankBenchSettings

METHODS = ("fused_base", "bank", "peft_mixed", "gather_lora")


def assign_adapters(mix: str, batch: int, resident: int, rng: random.Random, zipf_alpha: float = 1.5) -> list[int]:
    """The adapter index (0..resident-1) of each batch row under an adapter mix."""
    if mix == "identical":
        return [0] * batch
    if mix == "uniform":
        return [rng.randrange(resident) for _ in range(batch)]
    if mix == "zipf":
        weights = [1 / (k + 1) ** zipf_alpha for k in range(resident)]
        return rng.choices(range(resident), weights=weights, k=batch)
    if mix == "distinct":
        return [row % resident for row in range(batch)]
    raise ValueError(f"unknown adapter mix {mix!r}; choose one of {list(MIXES)}")


_GATHER_ROWS: ContextVar[Tensor | None] = ContextVar("fflora_gather_rows", default=None)


class GatherLoRALinear(nn.Module):
    """A projection plus stacked LoRA adapters, each row picking its own (vLLM's torch-native CPU path).

    y = W x + scale * B[idx] (A[idx] x): the per-row A and B are gathered from the stacks, then
    applied with batched einsums. Row index -1 is the base model (a zero adapter at the end).
    """

    def __init__(self, base: nn.Linear, a: list[Tensor], b: list[Tensor], scale: float) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("a", torch.stack([*a, torch.zeros_like(a[0])]))  # (K + 1, r, in)
        self.register_buffer("b", torch.stack([*b, torch.zeros_like(b[0])]))  # (K + 1, out, r)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        rows = _GATHER_ROWS.get()
        shrunk = torch.einsum("bti,bri->btr", x, self.a[rows])
        return self.base(x) + self.scale * torch.einsum("btr,bor->bto", shrunk, self.b[rows])


@contextlib.contextmanager
def gather_rows(rows: list[int]):
    token = _GATHER_ROWS.set(torch.tensor(rows))
    try:
        yield
    finally:
        _GATHER_ROWS.reset(token)


@torch.no_grad()
def ffba_states(base: nn.Module, config: FFBAConfig, count: int, seed: int) -> list[dict[str, Tensor]]:
    """`count` FFBA adapters with random weights, as canonical state dicts."""
    model = apply_adapter(copy.deepcopy(base), config)
    states = []
    for k in range(count):
        _randomize(model, seed + k)
        states.append(adapter_state_dict(model))
    return states


@torch.no_grad()
def peft_with_adapters(base: nn.Module, lora_rank: int, count: int, seed: int) -> nn.Module:
    """A PEFT model with `count` LoRA adapters a0..a{count-1} on the seven projections, random weights."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=LORA_TARGETS)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
    for k in range(count):
        name = f"a{k}"
        if k:
            model.add_adapter(name, config)
        gen = torch.Generator().manual_seed(10_000 + seed + k)
        for pname, p in model.named_parameters():
            if f".{name}." in pname:  # only this adapter's A and B (a fresh B is zero)
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def gather_lora_from_peft(base: nn.Module, peft_model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of `base` whose seven projections run the stacked LoRA adapters `names` of `peft_model`."""
    model = copy.deepcopy(base)
    lora_layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    for name, lora in lora_layers.items():
        parent, attr = name.rsplit(".", 1)
        holder = model.get_submodule(parent)
        a = [lora.lora_A[n].weight.detach() for n in names]
        b = [lora.lora_B[n].weight.detach() for n in names]
        setattr(holder, attr, GatherLoRALinear(getattr(holder, attr), a, b, lora.scaling[names[0]]))
    return model.eval()


class _Runner:
    """One method's model and how a forward pass tells it which adapter each row uses."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        self.model, self.kind = model, kind

    def forward(self, ids: Tensor, cache, rows: list[int]) -> Tensor:
        kwargs = {"input_ids": ids, "cache": cache, "use_cache": True}
        if self.kind == "bank":
            kwargs["adapter_names"] = [f"ffba{k}" for k in rows]
        elif self.kind == "peft_mixed":
            kwargs["adapter_names"] = [f"a{k}" for k in rows]
        context = gather_rows(rows) if self.kind == "gather_lora" else contextlib.nullcontext()
        with context:
            return self.model(**kwargs).logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def _time_cell(runners: dict[str, _Runner], prompt: Tensor, rows: list[int], settings: BankBenchSettings) -> dict[str, list[float]]:
    """Seconds per decode step of each method in each round; rounds interleave the methods, after a
    prefill and one untimed step each."""
    from transformers import DynamicCache

    state = {}
    for name, runner in runners.items():
        cache = DynamicCache(config=runner.model.config)
        token = runner.forward(prompt, cache, rows)
        state[name] = (cache, runner.forward(token, cache, rows))
    samples = {name: [] for name in runners}
    for _ in range(settings.rounds):
        for name, runner in runners.items():
            cache, token = state[name]
            start = time.perf_counter()
            for _ in range(settings.steps):
                token = runner.forward(token, cache, rows)
            samples[name].append((time.perf_counter() - start) / settings.steps)
            state[name] = (cache, token)
    return samples


def _cells(settings: BankBenchSettings):
    """(resident, batch, mix) of every cell; with one resident adapter every mix is 'identical'."""
    for resident in settings.resident:
        for batch in settings.batch_sizes:
            for mix in settings.mixes:
                if resident == 1 and mix != "identical" and "identical" in settings.mixes:
                    continue
                yield resident, batch, mix


def run_bank_bench(base: nn.Module, settings: BankBenchSettings) -> dict:
    """Every cell of the benchmark, as one JSON-ready dict."""
    from tqdm.auto import tqdm

    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    config = FFBAConfig(r=settings.rank, alpha=2 * settings.rank)
    lora_rank = settings.lora_rank or match_lora_rank(base.config, config)
    most = max(settings.resident)
    say(f"building {most} FFBA r={settings.rank} and {most} LoRA r={lora_rank} adapters")
    states = ffba_states(base, config, most, settings.seed)
    peft_model = peft_with_adapters(base, lora_rank, most, settings.seed)
    bank = FusedModel.build(copy.deepcopy(base), max_adapters=most, rank_budget=settings.rank * most)
    runners = {"fused_base": _Runner(fuse(copy.deepcopy(base)).eval(), "fused_base"),
               "bank": _Runner(bank.model.eval(), "bank"), "peft_mixed": _Runner(peft_model, "peft_mixed")}
    rng = random.Random(settings.seed)
    cells = []
    progress = tqdm(list(_cells(settings)), desc="bank bench", unit="cell")
    loaded = 0
    for resident, batch, mix in progress:
        if loaded != resident:  # the bank and the gather stacks hold K adapters; PEFT holds all of them
            for k in range(loaded, resident):
                bank.add(f"ffba{k}", config, states[k])
            runners["gather_lora"] = _Runner(gather_lora_from_peft(base, peft_model, [f"a{k}" for k in range(resident)]),
                                             "gather_lora")
            loaded = resident
        rows = assign_adapters(mix, batch, resident, rng, settings.zipf_alpha)
        gen = torch.Generator().manual_seed(settings.seed + batch)
        prompt = torch.randint(10, base.config.vocab_size, (batch, settings.prompt_len), generator=gen)
        progress.set_postfix_str(f"K={resident} batch={batch} {mix}")
        rounds = _time_cell(runners, prompt, rows, settings)
        cells.append({"resident": resident, "batch": batch, "mix": mix, "rows": rows, "adapters_present": len(set(rows)),
                      "tpot_s": {name: _median_spread(v) for name, v in rounds.items()}, "rounds_s": rounds,
                      "ratios": cell_ratios(rounds)})
    return {
        "model": getattr(base.config, "_name_or_path", None),
        "settings": asdict(settings),
        "ffba_rank": settings.rank,
        "lora_rank": lora_rank,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "cells": cells,
        "targets": check_bank_targets(cells),
    }


def cell_ratios(rounds: dict[str, list[float]]) -> dict:
    """Each ratio is the median over rounds of the ratio within a round: the methods of one round
    ran back to back, so drift of the shared machine between rounds cancels out."""
    def paired(num: str, den: str) -> float:
        return statistics.median(a / b for a, b in zip(rounds[num], rounds[den]))

    return {"bank_over_fused_base": paired("bank", "fused_base"), "peft_mixed_over_bank": paired("peft_mixed", "bank"),
            "gather_lora_over_bank": paired("gather_lora", "bank")}


def check_bank_targets(cells: list[dict], batch: int = 8) -> dict:
    """The issue's targets at batch 8: 8 distinct adapters within 1.15x of the fused base, one adapter
    for the whole batch within 1.05x, and the bank at least 1.5x faster than PEFT's mixed batch."""
    def find(resident, mix):
        return next((c for c in cells if c["batch"] == batch and c["resident"] == resident and c["mix"] == mix), None)

    targets = {}
    distinct = find(8, "distinct")
    if distinct:
        r = distinct["ratios"]
        targets["distinct8_bank_over_fused_base"] = r["bank_over_fused_base"]
        targets["distinct8_within_1.15"] = r["bank_over_fused_base"] <= 1.15
        targets["distinct8_peft_mixed_over_bank"] = r["peft_mixed_over_bank"]
        targets["distinct8_bank_1.5x_faster_than_peft"] = r["peft_mixed_over_bank"] >= 1.5
    identical = [c for c in cells if c["batch"] == batch and c["mix"] == "identical"]
    if identical:
        worst = max(c["ratios"]["bank_over_fused_base"] for c in identical)
        targets["identical_worst_bank_over_fused_base"] = worst
        targets["identical_within_1.05"] = worst <= 1.05
    return targets


def format_bank_table(result: dict) -> str:
    """Markdown: one table per batch size, a row per (K resident, mix)."""
    lines = [f"FFBA r={result['ffba_rank']} vs LoRA r={result['lora_rank']} (matched budget), "
             f"prompt {result['settings']['prompt_len']}, {result['threads']} threads, {result['settings']['rounds']} rounds of "
             f"{result['settings']['steps']} steps; ms per decode step (median over rounds), ratios: median of the "
             "ratios within each round", ""]
    for batch in result["settings"]["batch_sizes"]:
        lines += [f"**batch {batch}**", "",
                  "| K resident | mix | adapters in batch | fused base | bank | bank / fused base | PEFT mixed | PEFT / bank | gather LoRA | gather / bank |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in (c for c in result["cells"] if c["batch"] == batch):
            t, r = c["tpot_s"], c["ratios"]
            lines.append(
                f"| {c['resident']} | {c['mix']} | {c['adapters_present']} | {1e3 * t['fused_base']['median']:.1f} | "
                f"{1e3 * t['bank']['median']:.1f} | {r['bank_over_fused_base']:.3f} | {1e3 * t['peft_mixed']['median']:.1f} | "
                f"{r['peft_mixed_over_bank']:.2f} | {1e3 * t['gather_lora']['median']:.1f} | {r['gather_lora_over_bank']:.2f} |")
        lines.append("")
    t = result["targets"]
    if "distinct8_within_1.15" in t:
        lines.append(f"Targets (batch 8): 8 distinct adapters, bank / fused base = {t['distinct8_bank_over_fused_base']:.3f} "
                     f"({'met' if t['distinct8_within_1.15'] else 'NOT met'}: <= 1.15); PEFT mixed / bank = "
                     f"{t['distinct8_peft_mixed_over_bank']:.2f} ({'met' if t['distinct8_bank_1.5x_faster_than_peft'] else 'NOT met'}: >= 1.5).")
    if "identical_within_1.05" in t:
        lines.append(f"One adapter for the whole batch, worst over K: bank / fused base = {t['identical_worst_bank_over_fused_base']:.3f} "
                     f"({'met' if t['identical_within_1.05'] else 'NOT met'}: <= 1.05).")
    return "\n".join(lines)


def plot_bank(result: dict, path: Path) -> None:
    """Left: decode time / fused base per method and mix at batch 8 with the most resident adapters;
    right: bank / fused base against K resident, per mix, at batch 8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    batch = 8 if 8 in result["settings"]["batch_sizes"] else result["settings"]["batch_sizes"][-1]
    most = max(result["settings"]["resident"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    chosen = [c for c in cells if c["batch"] == batch and c["resident"] == most]
    width = 0.8 / max(len(chosen), 1)
    for i, c in enumerate(chosen):
        base = c["tpot_s"]["fused_base"]["median"]
        ratios = [c["tpot_s"][m]["median"] / base for m in METHODS]
        bars = left.bar([x + i * width for x in range(len(METHODS))], ratios, width, label=c["mix"])
        left.bar_label(bars, fmt="%.2f", fontsize=6)
    left.set_xticks([x + width * (len(chosen) - 1) / 2 for x in range(len(METHODS))], METHODS)
    left.axhline(1.0, color="gray", lw=0.8, ls="--")
    left.set_ylabel("decode step / fused base")
    left.set_title(f"batch {batch}, K={most} resident")
    left.legend(fontsize=7)
    for mix in result["settings"]["mixes"]:
        points = sorted((c["resident"], c["ratios"]["bank_over_fused_base"]) for c in cells if c["batch"] == batch and c["mix"] == mix)
        if points:
            right.plot(*zip(*points), marker="o", label=mix)
    right.axhline(1.0, color="gray", lw=0.8, ls="--")
    right.set_xscale("log", base=2)
    right.set_xlabel("adapters resident (K)")
    right.set_ylabel("bank / fused base")
    right.set_title(f"fused bank, batch {batch}")
    right.legend(fontsize=7)
    fig.suptitle(f"multi-adapter decode ({result['model']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_bank_bench(result: dict, out_dir: Path) -> Path:
    """bank.json, bank.md and bank.png in out_dir; returns the folder."""
    return write_results(result, out_dir, "bank", format_bank_table, plot_bank)

