"""The main job: both of the paper's claims, measured in one run on the embedded model.

`fflora demo` (or `make demo`) prepares the commonsense sets, trains FFBA, zFLoRA and LoRA at a
matched parameter budget with the same recipe and seed in the cloze form (the question, then the
gold answer's own text: the form a 135M model learns from, where label words measure label bias),
scores the base model and each trained one the same way (the gold answer's held-out NLL per token,
a continuous figure that moves within a few dozen steps, and cloze accuracy next to chance), runs
the latency benchmark, and writes `runs/demo-<time>/` (JSON, report.md, plots). `--quick` is a
five-minute smoke version with tiny sizes whose numbers mean nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..bench.latency import format_bench_table, run_bench, write_bench
from ..bench.settings import BenchSettings
from ..models.base_models import load_base_model
from ..models.footprint import peak_resident_bytes, release_memory
from ..recipes.artifacts import load_trained
from ..recipes.data import FAMILIES, prepare
from ..recipes.dtype import dtype_autocast
from ..recipes.evaluate import evaluate
from ..recipes.settings import TrainConfig
from ..recipes.train import train
from ..utils.method_names import DEFAULT_METHOD, method_names
from ..utils.sources import say

METHODS = (*method_names(), "lora")  # every fflora method, and LoRA as the peer


@dataclass(frozen=True)
class DemoSizes:
    train_limit: int
    max_steps: int
    eval_limit: int
    bench: dict
    lr: float = 1e-3


# The latency part times each method's inference form next to the base model and LoRA's two forms;
# the base weights are held once for the forms that only read them (`bench.latency.SHARES_BASE_WEIGHTS`),
# one model is loaded at a time elsewhere, freed memory goes back to the system between steps, and the
# training-step timing runs batches of 2 x 128 tokens (4 x 128 took 1.7 GB of activations on
# SmolLM2-135M), so the demo stays within 3 GB of resident memory (measured, in its report).
# `fflora bench` times every form, the fast path and batch 8; `fflora bench peers` the peers compiled.
DEMO_CONFIGS = ("base", "lora_unmerged", "lora_merged", *(f"{m}_fused" for m in method_names()))
# Sized for 30 minutes on 2 cores: at 640 examples / 80 steps / 100 items per set and batch sizes 1 and 8 in
# the latency part it took 43 (17 of them the latency part, mostly the compiled configurations' warm-up).
# `fflora study` measures accuracy.
FULL = DemoSizes(train_limit=480, max_steps=60, eval_limit=80,
                 bench=dict(prompt_len=128, new_tokens=32, batch_sizes=(1,), repeats=2, train_steps=2, train_batch=2,
                            configs=DEMO_CONFIGS))
QUICK = DemoSizes(train_limit=64, max_steps=6, eval_limit=8,
                  bench=dict(prompt_len=32, new_tokens=8, batch_sizes=(1,), repeats=1, train_steps=1, train_batch=2,
                             configs=DEMO_CONFIGS))


def _cloze(summary: dict) -> dict:
    """The gold answer's NLL per token and the cloze accuracies, per set and averaged over sets."""
    sets = {d: {"nll": r["nll"], "acc": r["accuracy"], "acc_norm": r["accuracy_norm"]}
            for d, r in summary["datasets"].items()}
    return {"nll": summary["nll_average"], "acc": summary["average"], "acc_norm": summary["accuracy_norm_average"],
            "sets": sets}


def run_demo(out_dir: str | Path | None = None, quick: bool = False, model: str | None = None,
             data_dir: str | None = None, lora_rank: int = 8) -> dict:
    sizes = QUICK if quick else FULL
    out = Path(out_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    steps = ["data", *(f"train {m}" for m in METHODS), "eval base", *(f"eval {m}" for m in METHODS), "bench", "report"]
    done = iter(range(len(steps)))
    peaks: dict[str, float] = {}  # the peak resident memory (GB) at the end of each step: where it rose

    def step() -> None:
        i = next(done)
        if i:
            peaks[steps[i - 1]] = peak_resident_bytes() / 1e9
        release_memory()  # what the last step freed goes back to the system, not into the next step's peak
        say(f"demo step {i + 1}/{len(steps)}: {steps[i]} ({time.time() - start:.0f} s so far)")

    step()
    prepare(["commonsense"], data_dir)
    runs = {}
    for method in METHODS:
        step()
        cfg = TrainConfig(method=method, task="commonsense", output_dir=str(out / method), model=model,
                          data_dir=data_dir, lora_r=lora_rank, lora_alpha=2.0 * lora_rank, match_params=True,
                          train_limit=sizes.train_limit, max_steps=sizes.max_steps, batch_size=8, lr=sizes.lr,
                          form="cloze", save_steps=sizes.max_steps, logging_steps=5)
        runs[method] = train(cfg, resume=(out / method / "train_config.json").exists())
    # Every model is scored in the dtype training chose (measured, `fflora.recipes.dtype.choose_dtype`): the same for all.
    eval_dtype = runs[DEFAULT_METHOD]["dtype"]["dtype"]
    scores = {}
    step()
    base, tokenizer = load_base_model(model)
    with dtype_autocast(eval_dtype, "cpu"):
        scores["base"] = evaluate(base, tokenizer, ["commonsense"], data_dir=data_dir, limit=sizes.eval_limit,
                                  mode="text", output=out / "base" / "eval.json")
    del base  # one model at a time: each trained one is loaded on its own base
    for method in METHODS:
        step()
        trained, tokenizer, _ = load_trained(out / method, base_model=model)
        with dtype_autocast(eval_dtype, "cpu"):
            scores[method] = evaluate(trained, tokenizer, ["commonsense"], data_dir=data_dir, limit=sizes.eval_limit,
                                      mode="text", output=out / method / "eval.json")
        del trained
    step()
    bench = run_bench(load_base_model(model)[0], BenchSettings(rank=runs[DEFAULT_METHOD]["parameters"]["ffba_r"], lora_rank=lora_rank, **sizes.bench))
    write_bench(bench, out)
    step()
    summary = {
        "quick": quick,
        "model": model or "SmolLM2-135M-Instruct",
        "wall_time_s": time.time() - start,
        "peak_resident_gb": peak_resident_bytes() / 1e9,
        "peak_resident_gb_by_step": peaks,
        "training": {m: {k: r[k] for k in ("global_step", "examples", "train_loss", "seconds_per_step", "tokens_per_s")}
                     | {"trainable": r["parameters"]["trainable"], "dtype": r["dtype"]["dtype"]} for m, r in runs.items()},
        "lr": sizes.lr,
        "eval_dtype": eval_dtype,
        "cloze": {name: _cloze(s) for name, s in scores.items()},
        "chance": {"average": scores["base"]["chance_average"],
                   **{d: r["chance"] for d, r in scores["base"]["datasets"].items()}},
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
    cloze, train_ = summary["cloze"], summary["training"]
    datasets = FAMILIES["commonsense"]
    base = cloze["base"]
    lines = [
        f"# fflora demo{' (quick: sizes too small to mean anything)' if summary['quick'] else ''}",
        "",
        f"{summary['model']}; FFBA, zFLoRA and LoRA at a matched budget, the same recipe, data and seed "
        f"({next(iter(train_.values()))['global_step']} steps of 8, lr {summary['lr']:g}, cloze form: the question, "
        f"then the gold answer's own text), scored with the base model on the first {summary['eval_limit']} test "
        f"items of each of the eight sets (in {summary['eval_dtype']}, the dtype training chose). Wall time "
        f"{summary['wall_time_s'] / 60:.1f} min; peak resident memory {summary['peak_resident_gb']:.2f} GB (after "
        + ", ".join(f"{name} {gb:.2f}" for name, gb in summary["peak_resident_gb_by_step"].items()) + ").",
        "",
        "| method | trainable | steps | dtype | tokens/s | gold answer NLL / token | vs base | acc (%) | acc_norm (%) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        f"| base model (no training) | 0 | | | | {base['nll']:.3f} | | {base['acc']:.1f} | {base['acc_norm']:.1f} |",
    ]
    for method in METHODS:
        t, c = train_[method], cloze[method]
        lines.append(f"| {method} | {t['trainable']:,} | {t['global_step']} | {t['dtype']} | {t['tokens_per_s']:.0f} | "
                     f"{c['nll']:.3f} | {c['nll'] - base['nll']:+.3f} | {c['acc']:.1f} | {c['acc_norm']:.1f} |")
    lines.append(f"| chance (same items) | | | | | | | {summary['chance']['average']:.1f} | "
                 f"{summary['chance']['average']:.1f} |")
    lines += ["", "acc_norm per set (%):", "",
              "| | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]
    for name in ("base", *METHODS):
        lines.append(f"| {name} | " + " | ".join(f"{cloze[name]['sets'][d]['acc_norm']:.1f}" for d in datasets) + " |")
    lines.append("| chance | " + " | ".join(f"{summary['chance'][d]:.1f}" for d in datasets) + " |")
    lines += ["", "What a run this short can show: whether each method moved the model (the gold answers' NLL, "
              "a continuous figure, falls within a few dozen steps) and roughly by how much. What it cannot show: "
              f"which method is more accurate. On {summary['eval_limit']} items per set one accuracy point is within "
              "noise, there is one seed and no tuned rate; that is the accuracy study's job (`fflora study`).",
              "", "## Latency", "", format_bench_table(bench)]
    return "\n".join(lines)


def plot_accuracy(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["base", *METHODS]
    cloze = summary["cloze"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1, 3]})
    bars = left.bar(names, [cloze[n]["nll"] for n in names], color=["gray", "C0", "C1", "C2"])
    left.bar_label(bars, fmt="%.3f", fontsize=7)
    left.set_ylabel("NLL per token")
    left.set_title("gold answers' NLL (lower is better)", fontsize=10)
    sets = [*FAMILIES["commonsense"], "average"]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [cloze[name]["sets"][d]["acc_norm"] for d in sets[:-1]] + [cloze[name]["acc_norm"]]
        right.bar([x + i * width for x in range(len(sets))], values, width, label=name,
                  color="gray" if name == "base" else f"C{i - 1}")
    centers = [x + width * (len(names) - 1) / 2 for x in range(len(sets))]
    right.scatter(centers, [summary["chance"][d] for d in sets[:-1]] + [summary["chance"]["average"]], marker="_",
                  s=900, color="black", label="chance", zorder=3)
    right.set_xticks(centers, sets)
    right.set_ylabel("acc_norm (%)")
    right.set_title(f"cloze accuracy, first {summary['eval_limit']} test items per set", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
