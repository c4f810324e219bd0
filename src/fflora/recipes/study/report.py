"""The aggregate of a study's records: per method the dev loss and every metric (mean +- std over
seeds, per set, next to its baseline), paired differences with bootstrap intervals, the decision
FFBA against LoRA, what the study took; as JSON, a markdown report and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...utils.files import atomic_write_text
from ..stats import mean_std, paired_bootstrap, set_average
from .schedule import study_seconds
from .spec import BASE_CELL, BASELINE_NAMES, COMPARED, Metric, StudySpec, best_rates, dropped_rates, metrics_of

ENGINE_NAMES = {"transformers": "transformers' generate", "slots": "fflora's slot engine"}


def _item_matrix(records: list[dict], metric: Metric) -> tuple[np.ndarray, list[str], list[str]]:
    """(seeds x items) values of a metric, item data sets and ids, items in one order for every record."""
    rows = [sorted(r["predictions"][metric.evaluation], key=lambda p: (p[0], p[1])) for r in records]
    ids = [p[1] for p in rows[0]]
    if any([p[1] for p in row] != ids for row in rows):
        raise ValueError(f"the final cells were evaluated on different items ({metric.evaluation}); rerun them "
                         "with one evaluation setting")
    return np.array([[p[metric.column] for p in row] for row in rows], dtype=float), [p[0] for p in rows[0]], ids


def _present(metric: Metric, records: list[dict]) -> bool:
    """Whether every record holds the metric (records written before a metric existed do not)."""
    return all(metric.evaluation in r.get("predictions", {}) and r["predictions"][metric.evaluation]
               and len(r["predictions"][metric.evaluation][0]) > metric.column for r in records)


def _baseline(metric: Metric, record: dict) -> dict | None:
    """{"name", "sets", "average"} of a metric's baseline (best constant answer, chance), from a cell's
    evaluation summary; None for metrics read against the base model only (NLL)."""
    datasets = record["eval"].get(metric.evaluation, {}).get("datasets", {})
    if metric.baseline is None or not datasets:
        return None
    sets = {s: d[metric.baseline]["accuracy"] if isinstance(d[metric.baseline], dict) else d[metric.baseline]
            for s, d in datasets.items()}
    name = "best constant label" if metric.name == "label acc" else BASELINE_NAMES[metric.baseline]
    return {"name": name, "sets": sets, "average": sum(sets.values()) / len(sets)}


def aggregate(spec: StudySpec, records: dict[str, dict]) -> dict:
    """Per method (and the untrained base model): dev loss and every metric, mean +- std over seeds, per
    set and on average, next to each set's baseline (best constant answer, chance), and on how many
    sets each seed beats it; paired differences with bootstrap 95% CIs (see `_comparisons`)."""
    best = best_rates(spec, records)
    finals: dict[str, list[dict]] = {}
    for record in records.values():
        cell = record["cell"]
        if cell["phase"] == "final" and "diverged" not in record and best.get(cell["method"]) == cell["lr"]:
            finals.setdefault(cell["method"], []).append(record)
    if BASE_CELL.key in records:
        finals["base"] = [records[BASE_CELL.key]]
    sweep = {m: {r["cell"]["lr"]: r["train"]["dev_loss"] for r in records.values()
                 if r["cell"]["phase"] == "sweep" and r["cell"]["method"] == m} for m in spec.methods}
    every = [r for runs in finals.values() for r in runs]
    metrics = {name: m for name, m in metrics_of(spec).items() if every and _present(m, every)}
    methods = {}
    for method, runs in finals.items():
        entry = {"lr": runs[0]["cell"]["lr"], "seeds": len(runs), "dropped_rates": sorted(dropped_rates(records, method)),
                 "parameters": runs[0]["parameters"],
                 "dev_loss": mean_std([r["train"]["dev_loss"] for r in runs]), "baselines": {}, "sets_above_baseline": {}}
        for name, metric in metrics.items():
            values, groups, _ = _item_matrix(runs, metric)
            per_seed = {g: metric.scale * values[:, np.asarray(groups) == g].mean(axis=1) for g in dict.fromkeys(groups)}
            entry[name] = {"average": mean_std([set_average(row, groups, metric.scale) for row in values]),
                           "sets": {g: mean_std(v) for g, v in per_seed.items()}}
            baseline = _baseline(metric, runs[0])
            if baseline:
                entry["baselines"][name] = baseline
                # per seed, on how many sets the metric beats its baseline (strictly)
                entry["sets_above_baseline"][name] = [
                    int(sum(v[seed] > baseline["sets"][g] for g, v in per_seed.items())) for seed in range(len(runs))]
        entry |= _training_summary(runs)
        methods[method] = entry
    comparisons = {}
    for a, b in _comparisons(finals):
        comparisons[f"{a} - {b}"] = {}
        for name, metric in metrics.items():
            va, groups, ids = _item_matrix(finals[a], metric)
            vb, _, ids_b = _item_matrix(finals[b], metric)
            if ids != ids_b:
                raise ValueError(f"{a} and {b} were evaluated on different items")
            comparisons[f"{a} - {b}"][name] = paired_bootstrap(va, vb, groups, scale=metric.scale)
    active_s, estimated = study_seconds(records)
    return {"study": spec.name, "cells_done": len(records), "sweep_dev_loss": sweep,
            "compute": {"active_hours": active_s / 3600, "device": spec.device, "estimated_cells": estimated},
            "metrics": {name: {"kind": m.kind, "evaluation": m.evaluation} for name, m in metrics.items()},
            "engines": _engines(spec, records),
            "methods": methods, "comparisons": comparisons, "decision": decide(spec, metrics, comparisons)}


def _engines(spec: StudySpec, records: dict[str, dict]) -> dict[str, dict[str, list[str]]]:
    """Per generate evaluation, the keys of the cells whose greedy answers each engine decoded (a record
    that names none is from before the choice: transformers' `generate`)."""
    out: dict[str, dict[str, list[str]]] = {}
    for evaluation in spec.scored():
        if evaluation["mode"] == "generate":
            for key, record in records.items():
                if evaluation["name"] in record.get("eval", {}):
                    engine = record["eval"][evaluation["name"]].get("engine", "transformers")
                    out.setdefault(evaluation["name"], {}).setdefault(engine, []).append(key)
    return out


def _training_summary(runs: list[dict]) -> dict:
    """A method's training over its seeds: the mean training loss at each logged step, and the
    gradient norm before clipping (median over seeds of each run's median) with the share of steps
    clipping cut (mean over seeds); empty where the records predate them (and for the base model)."""
    out = {}
    curves = [dict(r["train"]["loss_curve"]) for r in runs if r["train"].get("loss_curve")]
    if curves:
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        out["loss_curve"] = [[step, float(np.mean([c[step] for c in curves]))] for step in steps]
    norms = [r["train"]["grad_norm"] for r in runs if r["train"].get("grad_norm")]
    if norms:
        out["grad_norm"] = {"median": float(np.median([n["median"] for n in norms])),
                            "max": max(n["max"] for n in norms), "max_grad_norm": norms[0]["max_grad_norm"],
                            "clipped_share": float(np.mean([n["clipped_share"] for n in norms]))}
    return out


# How FFBA - LoRA is read on a metric, from its 95% interval: "better" or "worse" where the interval
# excludes 0; "equivalent" where it lies within +-margin; else "undecided". The margin of a loss
# (NLL) is this share of LoRA's gain over the base model; of an accuracy, these percentage points.
NLL_MARGIN_SHARE = 0.05
ACCURACY_MARGIN_POINTS = 1.0


def decide(spec: StudySpec, metrics: dict[str, Metric], comparisons: dict[str, dict]) -> dict:
    """FFBA against LoRA on the spec's primary metric and each secondary one (see NLL_MARGIN_SHARE):
    {metric: {"verdict", "difference", "ci95", "margin"}}, for the metrics the finals hold so far."""
    ffba_lora = comparisons.get(" - ".join(COMPARED), {})
    lora_base = comparisons.get(f"{COMPARED[1]} - base", {})
    out = {}
    for name in [spec.primary, *spec.secondary]:
        if name not in ffba_lora or name not in metrics:
            continue
        low, high = ffba_lora[name]["ci95"]
        if metrics[name].kind == "nll":  # lower is better
            better, worse = high < 0, low > 0
            margin = NLL_MARGIN_SHARE * abs(lora_base[name]["difference"]) if name in lora_base else None
        else:
            better, worse = low > 0, high < 0
            margin = ACCURACY_MARGIN_POINTS
        verdict = ("better" if better else "worse" if worse
                   else "equivalent" if margin is not None and -margin <= low and high <= margin else "undecided")
        out[name] = {"verdict": verdict, "difference": ffba_lora[name]["difference"], "ci95": [low, high],
                     "margin": margin, "primary": name == spec.primary}
    return out


def _comparisons(finals: dict[str, list[dict]]) -> list[tuple[str, str]]:
    """The paired differences to report: FFBA - LoRA first (the paper's claim), then every other
    trained method against LoRA, then every trained method against the untrained base model."""
    trained = [m for m in finals if m != "base"]
    pairs = [COMPARED] + [(m, COMPARED[1]) for m in trained if m not in COMPARED]
    pairs += [(m, "base") for m in trained]
    return [(a, b) for a, b in pairs if a in finals and b in finals]


def _digits(result: dict, metric: str) -> int:
    return 4 if result["metrics"][metric]["kind"] == "nll" else 1


def format_aggregate(result: dict) -> str:
    metrics = list(result["metrics"])
    first = next(iter(result["methods"].values()), None)
    with_baseline = [m for m in metrics if first and m in first["baselines"]]
    lines = [f"Study {result['study']} ({result['cells_done']} cells)", ""]
    if first:
        lines += ["| method | lr | seeds | trainable | dev loss | "
                  + "".join(f"{m} | " for m in metrics)
                  + "".join(f"{m} > {first['baselines'][m]['name']} (sets, per seed) | " for m in with_baseline),
                  "|---|---:|---:|---:|---:|" + "---:|" * (len(metrics) + len(with_baseline))]

    def ms(value: dict, digits: int = 1) -> str:
        return f"{value['mean']:.{digits}f} +- {value['std']:.{digits}f}"

    for method, e in result["methods"].items():
        dropped = e.get("dropped_rates")
        lr = "-" if e["lr"] is None else f"{e['lr']:g}"
        lr += f" ({', '.join(f'{x:g}' for x in dropped)}: final run diverged)" if dropped else ""
        name = "base model (no training)" if method == "base" else method
        above = [f"{', '.join(map(str, e['sets_above_baseline'][m]))} of {len(e['baselines'][m]['sets'])}"
                 for m in with_baseline]
        lines.append(f"| {name} | {lr} | {e['seeds']} | {e['parameters']:,} | {ms(e['dev_loss'], 4)} | "
                     + "".join(f"{ms(e[m]['average'], _digits(result, m))} | " for m in metrics)
                     + "".join(f"{a} | " for a in above))
    if first:
        cells = [f"{first['baselines'][m]['average']:.1f} ({first['baselines'][m]['name']})" if m in first["baselines"]
                 else "" for m in metrics]
        lines.append("| baseline on the same items | | | | | " + "".join(f"{c} | " for c in cells)
                     + "| " * len(with_baseline))
        for metric in metrics:
            lines += ["", f"{metric} per set (mean +- std over seeds):", ""] + _per_set_table(result, metric)
    if any(result["sweep_dev_loss"].values()):
        lines += [""] * bool(lines[-1]) + ["Sweep (dev loss per learning rate, one seed; in bold each method's lowest):", ""]
        lines += _sweep_table(result["sweep_dev_loss"])
    trained = {m: e for m, e in result["methods"].items() if "grad_norm" in e}
    if trained:
        lines += ["", "Training (gradient norm before clipping, median over each run's steps; share of steps "
                      "clipping cut):", "", "| method | grad norm (median) | largest | clipped at | clipped steps |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {m} | {e['grad_norm']['median']:.3g} | {e['grad_norm']['max']:.3g} | "
                  f"{e['grad_norm']['max_grad_norm']:g} | {100 * e['grad_norm']['clipped_share']:.0f}% |"
                  for m, e in trained.items()]
        lines += ["", "Clipping scales a step's whole gradient by max_grad_norm / norm. AdamW divides each update by the "
                      "running RMS of the gradients it was given, so a method clipped on every step has its steps "
                      "weighted against each other differently, not its updates shrunk: their size is the learning "
                      "rate, swept per method. A study run without clipping (max_grad_norm = 0) measures the rest."]
    if result.get("decision"):
        lines += ["", "Decision, FFBA - LoRA (better/worse: the 95% interval excludes 0; equivalent: it lies within "
                      "the margin; NLL margin 5% of LoRA's gain over the base model, accuracy 1 point):", ""]
        for metric, d in result["decision"].items():
            n = _digits(result, metric) + 1
            lines.append(f"- {metric}{' (primary)' if d['primary'] else ''}: **{d['verdict']}**, {d['difference']:+.{n}f} "
                         f"[{d['ci95'][0]:+.{n}f}, {d['ci95'][1]:+.{n}f}]"
                         + (f", margin +-{d['margin']:.{n}f}" if d["margin"] is not None else ""))
    for name, engines in result.get("engines", {}).items():
        lines += ["", f"Greedy answers of {name}: " + "; ".join(
            f"{ENGINE_NAMES.get(engine, engine)} for " + (", ".join(keys) if len(keys) <= 3 else f"{len(keys)} cells")
            for engine, keys in engines.items()) + "."]
    if result.get("compute"):
        c = result["compute"]
        lines += ["", f"Compute: {c['active_hours']:.1f} hours of active time on {c['device']} for the "
                      f"{result['cells_done']} cells (pauses taken out"
                      + (f"; {len(c['estimated_cells'])} cells resumed or older than their timing, counted at the "
                         "median of their kind" if c["estimated_cells"] else "") + ")."]
    if result.get("runner"):
        r = result["runner"]
        lines += ["", f"Stopped early at {r['at']}: {r['next']} (about {r['next_estimate_s'] / 60:.0f} min) would not "
                      f"have ended before {r['until']}; the study resumes where it stopped."]
    for name, compared in result["comparisons"].items():
        lines += ["", f"Paired difference {name} (accuracy in percentage points, NLL in nats per token; 95% "
                      "bootstrap CI over items and seeds):", ""]
        lines += [f"- {metric}: {c['difference']:+.{_digits(result, metric) + 1}f} "
                  f"[{c['ci95'][0]:+.{_digits(result, metric) + 1}f}, {c['ci95'][1]:+.{_digits(result, metric) + 1}f}]"
                  + (" (excludes 0)" if c["excludes_zero"] else " (includes 0)") for metric, c in compared.items()]
    return "\n".join(line.rstrip() for line in lines)


def _sweep_table(sweep: dict[str, dict]) -> list[str]:
    """Markdown rows: one per method with its dev loss at each swept rate ("diverged": no dev loss)."""
    rates = sorted({lr for losses in sweep.values() for lr in losses}, key=float)
    lines = ["| method | " + "".join(f"lr {float(r):g} | " for r in rates), "|---|" + "---:|" * len(rates)]
    for method, losses in sweep.items():
        finite = [v for v in losses.values() if v is not None]
        cells = ["" if r not in losses else "diverged" if losses[r] is None
                 else f"**{losses[r]:.4f}**" if losses[r] == min(finite) else f"{losses[r]:.4f}" for r in rates]
        if losses:
            lines.append(f"| {method} | " + "".join(f"{c} | " for c in cells))
    return lines


def _per_set_table(result: dict, metric: str) -> list[str]:
    """Markdown rows: one per method with its value on each set and on average, then the baseline's."""
    methods = result["methods"]
    digits = _digits(result, metric)
    sets = list(next(iter(methods.values()))[metric]["sets"])
    lines = ["| method | " + " | ".join(sets) + " | average |", "|---|" + "---:|" * (len(sets) + 1)]
    for method, e in methods.items():
        cells = [f"{e[metric]['sets'][s]['mean']:.{digits}f} +- {e[metric]['sets'][s]['std']:.{digits}f}" for s in sets]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {e[metric]['average']['mean']:.{digits}f} |")
    baseline = next(iter(methods.values()))["baselines"].get(metric)
    if baseline:
        lines.append(f"| {baseline['name']} | " + " | ".join(f"{baseline['sets'][s]:.1f}" for s in sets)
                     + f" | {baseline['average']:.1f} |")
    return lines


def plot_aggregate(result: dict, path: Path) -> None:
    """Left: the first metric per set for every method (the study's headline: its spec's first
    evaluation); middle: the sweep's dev loss per learning rate; right: each method's training loss
    curve in its final cells (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4))
    methods = result["methods"]
    headline = next(iter(result["metrics"]), None)
    sets = list(next(iter(methods.values()))[headline]["sets"]) if methods and headline else []
    width = 0.8 / max(1, len(methods))
    for k, (method, e) in enumerate(methods.items()):
        values = [e[headline]["sets"][s] for s in sets]
        axes[0].bar([i + k * width for i in range(len(sets))], [v["mean"] for v in values], width,
                    yerr=[v["std"] for v in values], capsize=3, label=method)
    axes[0].set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(sets))], sets, rotation=30)
    axes[0].set_title(f"{headline} per set (mean +- std over seeds)", fontsize=10)
    for method, losses in result["sweep_dev_loss"].items():
        if losses:
            lrs = sorted((lr for lr in losses if losses[lr] is not None), key=float)  # diverged: no point
            axes[1].plot([float(lr) for lr in lrs], [losses[lr] for lr in lrs], marker="o", label=method)
    axes[1].set_xscale("log")
    axes[1].set_title("dev loss after the sweep runs, per learning rate", fontsize=10)
    for method, e in methods.items():
        if e.get("loss_curve"):
            axes[2].plot(*zip(*e["loss_curve"]), label=f"{method} (dev {e['dev_loss']['mean']:.3f})")
    axes[2].set_xlabel("step")
    axes[2].set_title("training loss of the final cells (mean over seeds)", fontsize=10)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_aggregate(result: dict, results_dir: Path) -> None:
    atomic_write_text(results_dir / "aggregate.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(results_dir / "aggregate.md", format_aggregate(result) + "\n")
    plot_aggregate(result, results_dir / "aggregate.png")
