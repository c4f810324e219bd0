"""Training throughput: a training step in each dtype and batch layout, and whether bf16 learns as fp32.

`fflora bench train` times forward + backward of the same batches (the training mixture of a
task, in each data form) in five configurations, interleaved batch by batch in one process
(compare them by ratios, never across runs):

* first_study: float32, right-padded rows, logits at every position (transformers' own loss):
               the recipe of the first accuracy study;
* fp32_padded / fp32_packed / bf16_padded / bf16_packed: `fflora train` today (logits at the
               labelled positions only), padded or packed rows (`fflora.recipes.examples`), in float32 or
               bfloat16 autocast.

Then two short real runs (`fflora train`, packed, float32 and bfloat16, same seed and data) show
whether bf16 changes what is learnt: their logged loss curves side by side.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..methods import FFBAConfig, apply_adapter
from ..recipes.dtype import dtype_autocast
from ..recipes.examples import packed_attention_while, token_nll
from ..recipes.settings import TrainConfig
from ..recipes.train import build_dataset, collator, train, training_records
from ..utils.files import read_jsonl
from ..utils.sources import say
from .latency import write_results
from .settings import TrainBenchSettings

CONFIGS = {  # name -> (dtype, packed, logits at every position)
    "first_study": ("float32", False, True),
    "fp32_padded": ("float32", False, False),
    "fp32_packed": ("float32", True, False),
    "bf16_padded": ("bfloat16", False, False),
    "bf16_packed": ("bfloat16", True, False),
}



def _step(model, batch: dict, dtype: str, full_logits: bool) -> None:
    with dtype_autocast(dtype, "cpu"):
        loss = model(**batch).loss if full_logits else token_nll(model, batch).mean()
    loss.backward()
    for p in model.parameters():
        p.grad = None


def _throughput(model, tokenizer, settings: TrainBenchSettings, form: str) -> dict:
    cfg = TrainConfig(method="ffba", task="commonsense", output_dir="unused", data_dir=settings.data_dir,
                      seed=settings.seed, train_limit=8 * settings.batch_size * (settings.steps + 1), form=form)
    dataset = build_dataset(tokenizer, training_records(cfg), settings.max_length, form)
    batches = [[dataset[i] for i in range(start, start + settings.batch_size)]
               for start in range(0, settings.batch_size * (settings.steps + 1), settings.batch_size)]
    seconds = {name: 0.0 for name in CONFIGS}
    for i, examples in enumerate(batches):
        for name, (dtype, packed, full_logits) in CONFIGS.items():
            batch = collator(tokenizer, packed)(examples)
            with packed_attention_while(model, packed):
                start = time.perf_counter()
                _step(model, batch, dtype, full_logits)
                if i:  # the first batch warms up every configuration
                    seconds[name] += time.perf_counter() - start
    tokens = sum(len(e["input_ids"]) for examples in batches[1:] for e in examples)
    padded = sum(max(len(e["input_ids"]) for e in examples) * len(examples) for examples in batches[1:])
    reference = tokens / seconds["first_study"]
    return {"tokens": tokens, "padded_positions": padded, "mean_length": tokens / (len(batches) - 1) / settings.batch_size,
            "configs": {name: {"seconds_per_step": s / (len(batches) - 1), "tokens_per_s": tokens / s,
                               "vs_first_study": tokens / s / reference} for name, s in seconds.items()}}


def _loss_curves(model, tokenizer, settings: TrainBenchSettings) -> dict:
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            out = Path(tmp) / dtype
            cfg = TrainConfig(method="ffba", task="commonsense", output_dir=str(out), model=settings.model,
                              data_dir=settings.data_dir, r=settings.rank, alpha=2.0 * settings.rank,
                              max_steps=settings.curve_steps, batch_size=settings.batch_size,
                              max_length=settings.max_length, lr=settings.lr, seed=settings.seed, logging_steps=1,
                              save_steps=settings.curve_steps, form=settings.curve_form, dtype=dtype,
                              train_limit=settings.batch_size * settings.curve_steps)
            run = train(cfg, model=copy.deepcopy(model), tokenizer=tokenizer)
            logs = read_jsonl(out / "logs.jsonl")
            curves[dtype] = {"loss": [r["loss"] for r in logs if "loss" in r], "tokens_per_s": run["tokens_per_s"]}
    a, b = curves["float32"]["loss"], curves["bfloat16"]["loss"]
    tail = max(1, len(a) // 4)
    return {"form": settings.curve_form, "steps": settings.curve_steps, "curves": curves,
            "max_abs_difference": max(abs(x - y) for x, y in zip(a, b)),
            "last_quarter_mean": {"float32": sum(a[-tail:]) / tail, "bfloat16": sum(b[-tail:]) / tail}}


def run_train_bench(model, tokenizer, settings: TrainBenchSettings) -> dict:
    """Throughput per form and configuration, then the fp32 / bf16 loss curves."""
    torch.manual_seed(settings.seed)
    tokenizer.padding_side = "right"
    adapted = apply_adapter(copy.deepcopy(model), FFBAConfig(r=settings.rank, alpha=2.0 * settings.rank))
    adapted.train()
    result = {"settings": asdict(settings), "threads": torch.get_num_threads(), "throughput": {}}
    for form in settings.forms:
        say(f"bench train: timing {len(CONFIGS)} configurations on {form} batches")
        result["throughput"][form] = _throughput(adapted, tokenizer, settings, form)
    if settings.curve_steps:
        say(f"bench train: two {settings.curve_steps}-step runs, float32 and bfloat16")
        result["loss_curves"] = _loss_curves(model, tokenizer, settings)
    return result


def format_train_table(result: dict) -> str:
    s = result["settings"]
    lines = [f"Training step, FFBA r={s['rank']}, batch {s['batch_size']}, {result['threads']} threads, "
             f"{s['steps']} timed batches per cell (interleaved)", "",
             "| form | mean length | configuration | s/step | tokens/s | x first study |", "|---|---:|---|---:|---:|---:|"]
    for form, t in result["throughput"].items():
        for name, c in t["configs"].items():
            lines.append(f"| {form} | {t['mean_length']:.0f} | {name} | {c['seconds_per_step']:.2f} | "
                         f"{c['tokens_per_s']:.0f} | {c['vs_first_study']:.2f} |")
    curves = result.get("loss_curves")
    if curves:
        mean = curves["last_quarter_mean"]
        lines += ["", f"Loss curves, {curves['steps']} steps ({curves['form']} form, same seed and data): "
                      f"max |fp32 - bf16| of a logged loss {curves['max_abs_difference']:.4f}; mean of the last "
                      f"quarter fp32 {mean['float32']:.4f}, bf16 {mean['bfloat16']:.4f}; tokens/s of the runs "
                      f"fp32 {curves['curves']['float32']['tokens_per_s']:.0f}, "
                      f"bf16 {curves['curves']['bfloat16']['tokens_per_s']:.0f}"]
    return "\n".join(lines)


def plot_train(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    forms = list(result["throughput"])
    width = 0.8 / len(CONFIGS)
    for k, name in enumerate(CONFIGS):
        axes[0].bar([i + k * width for i in range(len(forms))],
                    [result["throughput"][f]["configs"][name]["tokens_per_s"] for f in forms], width, label=name)
    axes[0].set_xticks([i + width * (len(CONFIGS) - 1) / 2 for i in range(len(forms))], forms)
    axes[0].set_ylabel("tokens/s")
    axes[0].set_title("training throughput (forward + backward)", fontsize=10)
    axes[0].legend(fontsize=8)
    for dtype, curve in result.get("loss_curves", {}).get("curves", {}).items():
        axes[1].plot(range(1, len(curve["loss"]) + 1), curve["loss"], label=dtype)
    axes[1].set_xlabel("step")
    axes[1].set_title("training loss, float32 vs bfloat16 autocast", fontsize=10)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_train_bench(result: dict, out_dir: Path) -> Path:
    return write_results(result, out_dir, "train", format_train_table, plot_train)
