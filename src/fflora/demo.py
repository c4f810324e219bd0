"""The main job: both of the paper's claims, measured in one run on the embedded model.

`fflora demo` (or `make demo`) prepares a commonsense subset, trains FFBA, zFLoRA and LoRA at a
matched parameter budget with the same recipe and seed, evaluates both by log-likelihood scoring, runs the
latency benchmark, and writes `runs/demo-<time>/` (JSON, report.md, plots). `--quick` is a
five-minute smoke version with tiny sizes whose numbers mean nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .artifacts import load_trained
from .base_models import load_base_model
from .bench.latency import EAGER_CONFIGS, BenchSettings, format_bench_table, run_bench, write_bench
from .data import FAMILIES, prepare
from .evaluate import evaluate
from .sources import say
from .train import TrainConfig, train


@dataclass(frozen=True)
class DemoSizes:
    train_limit: int
    max_steps: int
    eval_limit: int
    bench: dict


FULL = DemoSizes(train_limit=320, max_steps=40, eval_limit=100,
                 bench=dict(prompt_len=128, new_tokens=32, batch_sizes=(1, 8), repeats=3, train_steps=2))
QUICK = DemoSizes(train_limit=64, max_steps=6, eval_limit=8,
                  bench=dict(prompt_len=32, new_tokens=8, batch_sizes=(1,), repeats=1, train_steps=1,
                             configs=EAGER_CONFIGS))  # compiling would take longer than the rest of it


def run_demo(out_dir: str | Path | None = None, quick: bool = False, model: str | None = None,
             data_dir: str | None = None, lora_rank: int = 8) -> dict:
    sizes = QUICK if quick else FULL
    out = Path(out_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    methods = ("ffba", "zflora", "lora")
    steps = ["data", *(f"train {m}" for m in methods), *(f"eval {m}" for m in methods), "bench", "report"]

    def step(i: int) -> None:
        say(f"demo step {i + 1}/{len(steps)}: {steps[i]} ({time.time() - start:.0f} s so far)")

    step(0)
    prepare(["commonsense"], data_dir)
    runs = {}
    for i, method in enumerate(methods):
        step(1 + i)
        cfg = TrainConfig(method=method, task="commonsense", output_dir=str(out / method), model=model,
                          data_dir=data_dir, lora_r=lora_rank, lora_alpha=2.0 * lora_rank, match_params=True,
                          train_limit=sizes.train_limit, max_steps=sizes.max_steps, batch_size=8,
                          save_steps=sizes.max_steps, logging_steps=5)
        runs[method] = train(cfg, resume=(out / method / "train_config.json").exists())
    accuracy = {}
    for i, method in enumerate(methods):
        step(1 + len(methods) + i)
        trained, tokenizer, _ = load_trained(out / method, base_model=model)
        accuracy[method] = evaluate(trained, tokenizer, ["commonsense"], data_dir=data_dir, limit=sizes.eval_limit,
                                    mode="loglik", output=out / method / "eval.json")
        del trained
    step(len(steps) - 2)
    base, _ = load_base_model(model)
    bench = run_bench(base, BenchSettings(rank=runs["ffba"]["parameters"]["ffba_r"], lora_rank=lora_rank, **sizes.bench))
    write_bench(bench, out)
    step(len(steps) - 1)
    summary = {
        "quick": quick,
        "model": model or "SmolLM2-135M-Instruct",
        "wall_time_s": time.time() - start,
        "training": {m: {k: r[k] for k in ("global_step", "examples", "train_loss", "seconds_per_step")}
                     | {"trainable": r["parameters"]["trainable"]} for m, r in runs.items()},
        "accuracy": {m: {"average": a["average"], **{d: v["accuracy"] for d, v in a["datasets"].items()}}
                     for m, a in accuracy.items()},
        "best_constant": {"average": accuracy["ffba"]["best_constant_average"],
                          **{d: v["best_constant"]["accuracy"] for d, v in accuracy["ffba"]["datasets"].items()}},
        "eval_limit": sizes.eval_limit,
        "tpot_ratio_to_base": {b: {c: r["tpot"]["median"] / per["base"]["tpot"]["median"] for c, r in per.items()}
                               for b, per in bench["latency"].items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = format_report(summary, bench)
    (out / "report.md").write_text(report + "\n")
    plot_accuracy(summary, out / "accuracy.png")
    print(report)
    print(f"\nreport in {out}/ (report.md, summary.json, bench.json, accuracy.png, bench.png)")
    return summary


def format_report(summary: dict, bench: dict) -> str:
    acc, train_ = summary["accuracy"], summary["training"]
    datasets = FAMILIES["commonsense"]
    lines = [
        f"# fflora demo{' (quick: sizes too small to mean anything)' if summary['quick'] else ''}",
        "",
        f"{summary['model']}; FFBA, zFLoRA and LoRA at matched budget, same recipe and seed; "
        f"log-likelihood accuracy on the first {summary['eval_limit']} test examples of each set. "
        f"Wall time {summary['wall_time_s'] / 60:.1f} min.",
        "",
        "| method | trainable | steps | s/step | " + " | ".join(datasets) + " | average |",
        "|---|---:|---:|---:|" + "---:|" * (len(datasets) + 1),
    ]
    for method in acc:
        t = train_[method]
        lines.append(f"| {method} | {t['trainable']:,} | {t['global_step']} | {t['seconds_per_step']:.2f} | "
                     + " | ".join(f"{acc[method][d]:.1f}" for d in datasets) + f" | **{acc[method]['average']:.1f}** |")
    constant = summary["best_constant"]
    lines.append("| best constant label (same items) | | | | " + " | ".join(f"{constant[d]:.1f}" for d in datasets)
                 + f" | {constant['average']:.1f} |")
    lines += ["", "## Latency", "", format_bench_table(bench)]
    return "\n".join(lines)


def plot_accuracy(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*FAMILIES["commonsense"], "average"]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(summary["accuracy"])
    for i, (method, acc) in enumerate(summary["accuracy"].items()):
        bars = ax.bar([x + i * width for x in range(len(names))], [acc[n] for n in names], width, label=method)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    centers = [x + width * (len(summary["accuracy"]) - 1) / 2 for x in range(len(names))]
    ax.scatter(centers, [summary["best_constant"][n] for n in names], marker="_", s=900, color="black",
               label="best constant label", zorder=3)
    ax.set_xticks(centers, names)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"commonsense accuracy, first {summary['eval_limit']} test examples per set")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
