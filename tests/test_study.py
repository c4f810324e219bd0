"""The study runner on a tiny model: resumable cells, learning-rate choice by dev loss, the aggregate."""

import json
from pathlib import Path

import numpy as np
import pytest

from fflora.recipes.study import Cell, StudySpec, aggregate, best_rates, format_aggregate, plan, read_records, run_study
from fflora.recipes.study.spec import BASE_CELL


def _spec(tiny_model_dir, tiny_data_dir, **kw):
    base = dict(name="tiny", model=str(tiny_model_dir), data_dir=str(tiny_data_dir), dev_size=8, eval_limit=2,
                sweep_steps=2, final_steps=2, learning_rates=[1e-3, 3e-2], seeds={"ffba": 2, "lora": 1},
                methods={"ffba": {"method": "ffba", "r": 2, "alpha": 4}, "lora": {"method": "lora", "lora_r": 2}},
                train={"batch_size": 4, "max_length": 1024, "save_steps": 1, "logging_steps": 1, "warmup_ratio": 0.0,
                       "dtype": "float32"})
    base.update(kw)
    return StudySpec(**base)


def test_a_study_runs_every_cell_once_and_resumes(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    import fflora.recipes.study.runner as study
    import fflora.recipes.train as train_module

    spec = _spec(tiny_model_dir, tiny_data_dir)
    results, runs = tmp_path / "results", tmp_path / "runs"

    # Interrupt the first cell right after its first checkpoint is written.
    original = train_module.FFLoraTrainer._save_checkpoint

    def crash_after_saving(self, model, trial):
        original(self, model, trial)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.FFLoraTrainer, "_save_checkpoint", crash_after_saving)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, results, runs)
    monkeypatch.undo()
    records = read_records(results / "tiny")  # the base model's cell ran first (nothing to train)
    assert list(records) == ["base-model"] and records["base-model"]["parameters"] == 0
    assert records["base-model"]["train"]["dev_loss"] > 0
    assert records["base-model"]["eval"]["loglik"]["datasets"]["boolq"]["n"] == 2

    first = run_study(spec, results, runs, max_cells=1)  # resumes the interrupted cell
    records = read_records(results / "tiny")
    key = Cell("sweep", "ffba", 1e-3, 0).key
    assert list(records) == ["base-model", key] and records[key]["train"]["resumed_from"].endswith("checkpoint-1")
    assert list(first["methods"]) == ["base"]  # no final cell yet

    result = run_study(spec, results, runs)
    records = read_records(results / "tiny")
    assert len(records) == 1 + 4 + 3  # the base model, 2 methods x 2 rates, then 2 + 1 seeds at the best rates
    best = best_rates(spec, records)
    for method in ("ffba", "lora"):
        losses = {lr: records[Cell("sweep", method, lr, 0).key]["train"]["dev_loss"] for lr in spec.learning_rates}
        assert best[method] == min(losses, key=losses.get)
        assert records[Cell("final", method, best[method], 0).key]["eval"]["text"]["datasets"]["piqa"]["n"] == 2
    final = records[Cell("final", "ffba", best["ffba"], 1).key]
    assert len(final["predictions"]["loglik"]) == 16 and len(final["predictions"]["text"][0]) == 7
    assert all(row[6] > 0 for row in final["predictions"]["text"])  # the gold answer's NLL per token
    timing = final["timing"]  # what --until plans with: active seconds of training and of evaluation
    assert timing["steps_run"] == 2 and timing["train_s"] > 0 and timing["evaluate_s"] > 0 and timing["paused_s"] == 0
    assert [step for step, _ in final["train"]["loss_curve"]] == [1, 2]
    assert final["train"]["grad_norm"]["steps"] == 2 and 0 <= final["train"]["grad_norm"]["clipped_share"] <= 1
    assert result["methods"]["ffba"]["seeds"] == 2
    assert list(result["comparisons"]) == ["ffba - lora", "ffba - base", "lora - base"]
    assert result["compute"]["estimated_cells"] == [key]  # resumed: its run measured half its steps
    assert result["compute"]["active_hours"] > 0
    assert (results / "tiny" / "aggregate.md").read_text().startswith("Study tiny (8 cells)")
    assert "Compute: " in (results / "tiny" / "aggregate.md").read_text()
    assert (results / "tiny" / "aggregate.png").stat().st_size > 0

    monkeypatch.setattr(study, "train", lambda *a, **k: pytest.fail("a finished cell was trained again"))
    assert run_study(spec, results, runs)["cells_done"] == 8
    assert plan(spec, read_records(results / "tiny")) == ([], 0)


def test_the_plan_runs_ready_final_cells_first_seed_by_seed(tiny_model_dir, tiny_data_dir):
    spec = _spec(tiny_model_dir, tiny_data_dir)

    def sweep(method, lr, loss):
        return _sweep_record(method, lr, loss)

    records = {**sweep("ffba", 1e-3, 0.5), **sweep("ffba", 3e-2, None), **sweep("lora", 1e-3, 0.7)}
    todo, waiting = plan(spec, records)  # FFBA's sweep is done (3e-2 diverged), LoRA's is not
    # FFBA's first seed, the base model, LoRA's sweep (the compared pair), then FFBA's further seeds
    assert [c.key for c in todo] == ["final-ffba-lr0.001-seed0", "base-model", "sweep-lora-lr0.03-seed0",
                                     "final-ffba-lr0.001-seed1"]
    assert waiting == 1
    assert plan(spec, records, phase="sweep") == ([Cell("sweep", "lora", 3e-2, 0)], 0)
    assert [c.key for c in plan(spec, records, phase="final")[0]] == ["final-ffba-lr0.001-seed0", "base-model",
                                                                      "final-ffba-lr0.001-seed1"]
    with pytest.raises(ValueError, match="phase must be 'sweep' or 'final'"):
        plan(spec, records, phase="sweeps")

    records |= sweep("lora", 3e-2, 0.6)
    todo, waiting = plan(spec, records)
    assert [c.key for c in todo] == ["final-ffba-lr0.001-seed0", "final-lora-lr0.03-seed0", "base-model",
                                     "final-ffba-lr0.001-seed1"]
    assert waiting == 0

    records[todo[0].key] = {"cell": {"phase": "final", "method": "ffba", "lr": 1e-3, "seed": 0}, "train": {"dev_loss": 0.4}}
    assert [c.key for c in plan(spec, records)[0]] == ["final-lora-lr0.03-seed0", "base-model", "final-ffba-lr0.001-seed1"]


def test_the_plan_runs_the_compared_pairs_seeds_before_the_other_methods(tiny_model_dir, tiny_data_dir):
    """The issue's order: FFBA and LoRA at every seed first, then FA-only and the rest, even where
    another method's first final is ready before the pair's further seeds."""
    spec = _spec(tiny_model_dir, tiny_data_dir, seeds={"ffba": 2, "lora": 2, "fa": 1, "ba": 1},
                 methods={"ffba": {"method": "ffba", "r": 2, "alpha": 4}, "lora": {"method": "lora", "lora_r": 2},
                          "fa": {"method": "ffba", "r": 3, "backward": False},
                          "ba": {"method": "ffba", "r": 3, "forward": False}})
    records = {}
    for method, losses in {"ffba": (0.5, 0.6), "lora": (0.7, 0.6), "fa": (0.9, 0.8)}.items():
        for lr, loss in zip(spec.learning_rates, losses):
            records |= _sweep_record(method, lr, loss)
    records |= {BASE_CELL.key: {"cell": {"phase": "base"}}}
    todo, waiting = plan(spec, records)
    assert [c.key for c in todo] == ["final-ffba-lr0.001-seed0", "final-lora-lr0.03-seed0", "final-ffba-lr0.001-seed1",
                                     "final-lora-lr0.03-seed1", "final-fa-lr0.03-seed0", "sweep-ba-lr0.001-seed0",
                                     "sweep-ba-lr0.03-seed0"]
    assert waiting == 1  # BA's final, until its sweep is done


def _sweep_record(method, lr, loss):
    return {Cell("sweep", method, lr, 0).key: {"cell": {"phase": "sweep", "method": method, "lr": lr, "seed": 0},
                                               "train": {"dev_loss": loss}}}


def _record(method, seed, correct_label, correct_text, sets, dev_loss):
    """A final cell's record with the given 0/1 correctness per item (items named by set and index)."""
    items = [(s, f"{s}-{i}") for s in sets for i in range(len(correct_label) // len(sets))]
    return {"cell": {"phase": "final", "method": method, "lr": 1e-3, "seed": seed}, "parameters": 100,
            "train": {"dev_loss": dev_loss},
            "eval": {"loglik": {"best_constant_average": 50.0,
                                "datasets": {s: {"best_constant": {"label": 0, "accuracy": 50.0}} for s in sets}},
                     "text": {"chance_average": 50.0, "datasets": {s: {"chance": 50.0} for s in sets}}},
            "predictions": {"loglik": [[s, i, 0, c] for (s, i), c in zip(items, correct_label)],
                            "text": [[s, i, 0, c, 0, c] for (s, i), c in zip(items, correct_text)]}}


def test_the_aggregate_on_synthetic_records_with_known_answers(tiny_model_dir, tiny_data_dir):
    spec = _spec(tiny_model_dir, tiny_data_dir, primary="text acc_norm")
    sets = ["a", "b"]
    records = {
        "f0": _record("ffba", 0, [1, 1, 1, 1], [1, 1, 0, 1], sets, 1.0),   # label 100, text: a 100, b 50
        "f1": _record("ffba", 1, [1, 1, 0, 0], [1, 1, 0, 1], sets, 2.0),   # label: a 100, b 0 -> 50
        "l0": _record("lora", 0, [0, 0, 0, 0], [1, 1, 0, 1], sets, 3.0),
        "base-model": _record("base", None, [0, 1, 0, 1], [0, 0, 0, 0], sets, 4.0)   # label 50, text 0
        | {"cell": {"phase": "base", "method": "base", "lr": None, "seed": None}, "parameters": 0},
    }
    for method in ("ffba", "lora"):  # both sweeps done, 1e-3 the best rate
        records |= _sweep_record(method, 1e-3, 0.5) | _sweep_record(method, 3e-2, 0.9)
    result = aggregate(spec, records)
    ffba = result["methods"]["ffba"]
    assert ffba["dev_loss"] == {"mean": 1.5, "std": pytest.approx(np.sqrt(0.5)), "n": 2}
    assert ffba["label acc"]["average"]["mean"] == 75.0 and ffba["label acc"]["sets"]["b"]["mean"] == 50.0
    assert ffba["text acc"]["average"] == {"mean": 75.0, "std": 0.0, "n": 2}
    comparison = result["comparisons"]["ffba - lora"]
    assert comparison["label acc"]["difference"] == 75.0 and comparison["label acc"]["excludes_zero"]
    assert comparison["text acc_norm"]["difference"] == 0.0 and comparison["text acc_norm"]["ci95"] == [0.0, 0.0]
    table = format_aggregate(result)
    assert "| ffba | 0.001 | 2 | 100 | 1.5000 +- 0.7071 | 75.0 +- 35.4 |" in table
    assert "- label acc: +75.00" in table
    assert result["comparisons"]["ffba - base"]["label acc"]["difference"] == 25.0
    assert result["comparisons"]["lora - base"]["text acc"]["difference"] == 75.0
    assert "| base model (no training) | - | 1 | 0 | 4.0000 +- 0.0000 | 50.0 +- 0.0 | 0.0 +- 0.0 |" in table
    # Beating the best constant label (50 on each set) is strict: the base model's 50 and 50 do not.
    above = {m: e["sets_above_baseline"]["label acc"] for m, e in result["methods"].items()}
    assert above == {"ffba": [2, 1], "lora": [0], "base": [0]}
    assert ffba["baselines"]["label acc"] == {"name": "best constant label", "sets": {"a": 50.0, "b": 50.0},
                                              "average": 50.0}
    assert "| 75.0 +- 35.4 | 75.0 +- 0.0 | 75.0 +- 0.0 | 2, 1 of 2 | 1, 1 of 2 | 1, 1 of 2 |" in table
    assert "| baseline on the same items | | | | | 50.0 (best constant label) | 50.0 (chance) | 50.0 (chance) |" in table
    assert list(result["metrics"]) == ["label acc", "text acc", "text acc_norm"]  # no NLL column in these rows
    per_set = table.split("label acc per set (mean +- std over seeds):")[1]
    assert "| ffba | 100.0 +- 0.0 | 50.0 +- 70.7 | 75.0 |" in per_set
    assert "| best constant label | 50.0 | 50.0 | 50.0 |" in per_set
    assert "| chance | 50.0 | 50.0 | 50.0 |" in table.split("text acc per set")[1]
    assert result["decision"]["text acc_norm"]["verdict"] == "equivalent"  # a difference of 0, within 1 point
    assert "- text acc_norm (primary): **equivalent**, +0.00 [+0.00, +0.00], margin +-1.00" in table
    sweep = table.split("Sweep (dev loss per learning rate")[1]
    assert "| method | lr 0.001 | lr 0.03 |\n|---|---:|---:|\n| ffba | **0.5000** | 0.9000 |" in sweep
    # A study run in its sweep phase alone reports the sweep, with no empty table of finals
    sweeps_only = format_aggregate(aggregate(spec, {k: v for k, v in records.items() if k.startswith("sweep")}))
    assert sweeps_only.startswith("Study tiny (4 cells)\n\nSweep (dev loss") and "| method | lr |" not in sweeps_only


def test_the_aggregate_compares_every_trained_method_with_lora_and_the_base_model(tiny_model_dir, tiny_data_dir):
    spec = _spec(tiny_model_dir, tiny_data_dir, seeds={"ffba": 1, "lora": 1, "fa": 1},
                 methods={"ffba": {"method": "ffba", "r": 2}, "lora": {"method": "lora", "lora_r": 2},
                          "fa": {"method": "ffba", "r": 4, "backward": False}})
    sets = ["a"]
    records = {"f": _record("ffba", 0, [1, 1], [1, 1], sets, 1.0), "l": _record("lora", 0, [1, 0], [1, 0], sets, 1.0),
               "a": _record("fa", 0, [0, 0], [1, 0], sets, 1.0)}
    for method in spec.methods:
        records |= _sweep_record(method, 1e-3, 0.5) | _sweep_record(method, 3e-2, 0.9)
    comparisons = aggregate(spec, records)["comparisons"]
    assert list(comparisons) == ["ffba - lora", "fa - lora"]  # no base-model cell yet: no "- base" rows
    assert comparisons["fa - lora"]["label acc"]["difference"] == -50.0
    assert comparisons["fa - lora"]["text acc"]["difference"] == 0.0


def test_a_rate_whose_final_run_diverges_is_dropped_for_the_next_best(tiny_model_dir, tiny_data_dir):
    spec = _spec(tiny_model_dir, tiny_data_dir, learning_rates=[1e-4, 1e-3, 3e-2], seeds={"ffba": 1},
                 methods={"ffba": {"method": "ffba", "r": 2}})
    records = _sweep_record("ffba", 1e-4, 0.7) | _sweep_record("ffba", 1e-3, 0.9) | _sweep_record("ffba", 3e-2, 0.5)
    assert best_rates(spec, records) == {"ffba": 3e-2}
    broken = Cell("final", "ffba", 3e-2, 0)
    records[broken.key] = {"cell": {"phase": "final", "method": "ffba", "lr": 3e-2, "seed": 0},
                           "diverged": "non-finite loss (nan) at step 150", "train": {"dev_loss": None}}
    assert best_rates(spec, records) == {"ffba": 1e-4}  # the next-best dev loss, not the next rate down
    assert [c.key for c in plan(spec, records)[0]] == ["final-ffba-lr0.0001-seed0", "base-model"]

    records["done"] = _record("ffba", 0, [1, 0], [1, 1], ["a"], 0.6) | {
        "cell": {"phase": "final", "method": "ffba", "lr": 1e-4, "seed": 0}}
    result = aggregate(spec, records)
    assert result["methods"]["ffba"]["lr"] == 1e-4 and result["methods"]["ffba"]["seeds"] == 1
    assert result["methods"]["ffba"]["dropped_rates"] == [3e-2]
    assert "| ffba | 0.0001 (0.03: final run diverged) | 1 | 100 | 0.6000 +- 0.0000 |" in format_aggregate(result)


def test_bad_specs_are_refused_before_anything_runs(tiny_model_dir, tiny_data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"the study sets \['lr'\] itself"):
        _spec(tiny_model_dir, tiny_data_dir, methods={"ffba": {"method": "ffba", "lr": 1e-3}}, seeds={})
    with pytest.raises(ValueError, match=r"unknown training settings \['rank'\]"):
        _spec(tiny_model_dir, tiny_data_dir, methods={"ffba": {"method": "ffba", "rank": 8}}, seeds={})
    with pytest.raises(ValueError, match="'base' names the untrained base model's cell"):
        _spec(tiny_model_dir, tiny_data_dir, methods={"base": {"method": "lora"}}, seeds={})
    with pytest.raises(ValueError, match=r"seeds given for methods the spec does not define: \['dora'\]"):
        _spec(tiny_model_dir, tiny_data_dir, seeds={"dora": 1})
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"name": "x", "methods": {}, "learning_rates": [], "seeds": {}, "epochz": 1}))
    with pytest.raises(ValueError, match=r"unknown study settings \['epochz'\]"):
        StudySpec.load(path)


def test_the_loss_spike_guard_is_set_on_final_cells_only(tiny_model_dir, tiny_data_dir):
    """Sweep runs are judged by their dev loss; a final run that spikes has diverged."""
    from fflora.recipes.train import LossSpikeError, TrainingDivergedError

    spec = _spec(tiny_model_dir, tiny_data_dir, final_max_loss_ratio=3.0)
    assert spec.train_config(Cell("final", "lora", 1e-3, 1), Path("runs")).max_loss_ratio == 3.0
    assert spec.train_config(Cell("sweep", "lora", 1e-3, 0), Path("runs")).max_loss_ratio is None
    assert _spec(tiny_model_dir, tiny_data_dir).train_config(Cell("final", "ffba", 1e-3, 0), Path("r")).max_loss_ratio is None
    assert issubclass(LossSpikeError, TrainingDivergedError)  # what run_cell records as "diverged"
    with pytest.raises(ValueError, match=r"the study sets \['max_loss_ratio'\] itself"):
        _spec(tiny_model_dir, tiny_data_dir, train={"max_loss_ratio": 2.0})


def test_a_study_keeps_one_device(tiny_model_dir, tiny_data_dir, tmp_path):
    import torch

    spec = _spec(tiny_model_dir, tiny_data_dir, device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asks for device 'cuda' but torch sees no CUDA device"):
            run_study(spec, tmp_path / "results", tmp_path / "runs")
    folder = tmp_path / "results" / "tiny"
    folder.mkdir(parents=True)
    (folder / "sweep-ffba-lr0.001-seed0.json").write_text(json.dumps({"device": "cuda"}))
    with pytest.raises(ValueError, match=r"holds cells run on \['cuda'\], this run is on 'cpu'"):
        run_study(_spec(tiny_model_dir, tiny_data_dir), tmp_path / "results", tmp_path / "runs")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        _spec(tiny_model_dir, tiny_data_dir, device="tpu")


def test_a_diverged_cell_is_recorded_and_the_study_goes_on(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """A learning rate at which training blows up is a sweep result (never the best), not the study's end."""
    import fflora.recipes.study.runner as study
    from fflora.recipes.train import NonFiniteLossError

    spec = _spec(tiny_model_dir, tiny_data_dir, seeds={"ffba": 1}, methods={"ffba": {"method": "ffba", "r": 2}})
    real_train = study.train

    def diverge_at_high_rates(cfg, **kwargs):
        if cfg.lr > 1e-2:
            raise NonFiniteLossError("non-finite loss (nan) at step 2")
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(study, "train", diverge_at_high_rates)
    result = run_study(spec, tmp_path / "results", tmp_path / "runs")
    records = read_records(tmp_path / "results" / "tiny")
    diverged = records[Cell("sweep", "ffba", 3e-2, 0).key]
    assert diverged["diverged"] == "non-finite loss (nan) at step 2" and diverged["train"]["dev_loss"] is None
    assert best_rates(spec, records) == {"ffba": 1e-3}
    assert result["methods"]["ffba"]["lr"] == 1e-3 and result["sweep_dev_loss"]["ffba"][3e-2] is None


MATH_EVALUATIONS = [{"name": "rationale", "mode": "nll", "tasks": ["gsm8k", "svamp"]},
                    {"name": "arith", "mode": "generate", "tasks": ["addsub", "singleeq"], "max_new_tokens": 3,
                     "engine": "slots"}]


def test_a_math_study_scores_rationale_nll_and_exact_match(tiny_model_dir, tiny_data_dir, tmp_path):
    """The base model's cell of a math study: every evaluation's rows, with their baselines."""
    spec = _spec(tiny_model_dir, tiny_data_dir, task="math", evaluations=MATH_EVALUATIONS, dev_size=4, eval_limit=3)
    result = run_study(spec, tmp_path / "results", tmp_path / "runs", max_cells=1, phase="final")
    record = read_records(tmp_path / "results" / "tiny")["base-model"]
    rationale, arith = record["predictions"]["rationale"], record["predictions"]["arith"]
    assert [row[0] for row in rationale] == ["gsm8k"] * 3 + ["svamp"] * 3 and all(row[2] > 0 for row in rationale)
    assert [len(row) for row in arith] == [4] * 6 and {row[3] for row in arith} <= {0, 1}
    assert record["eval"]["arith"]["datasets"]["addsub"]["best_constant"]["accuracy"] == pytest.approx(100 / 3)
    assert record["eval"]["arith"]["engine"] == "slots" and "engine" not in record["eval"]["rationale"]
    assert result["engines"] == {"arith": {"slots": ["base-model"]}}
    del record["eval"]["arith"]["engine"]  # a record from before the choice: transformers' generate
    older = aggregate(spec, {"base-model": record, "other": record})
    assert older["engines"] == {"arith": {"transformers": ["base-model", "other"]}}
    assert "Greedy answers of arith: transformers' generate for base-model, other." in format_aggregate(older)
    base = result["methods"]["base"]
    assert list(result["metrics"]) == ["rationale nll", "arith exact match"]
    expected = np.mean([np.mean([r[2] for r in rationale if r[0] == s]) for s in ("gsm8k", "svamp")])
    assert base["rationale nll"]["average"]["mean"] == pytest.approx(expected)
    assert "rationale nll" not in base["baselines"] and base["baselines"]["arith exact match"]["name"] == "best constant answer"


def test_nll_metrics_aggregate_unscaled_with_paired_intervals(tiny_model_dir, tiny_data_dir):
    spec = _spec(tiny_model_dir, tiny_data_dir, task="math", evaluations=MATH_EVALUATIONS[:1],
                 seeds={"ffba": 1, "lora": 1})

    def record(method, values):
        return {"cell": {"phase": "final", "method": method, "lr": 1e-3, "seed": 0}, "parameters": 1,
                "train": {"dev_loss": 1.0}, "eval": {"rationale": {"datasets": {"gsm8k": {}, "svamp": {}}}},
                "predictions": {"rationale": [[s, f"{s}-{i}", v, 10] for (s, i), v in
                                              zip([("gsm8k", 0), ("gsm8k", 1), ("svamp", 0)], values)]}}

    records = {"f": record("ffba", [1.0, 2.0, 0.5]), "l": record("lora", [1.5, 2.5, 1.5])}
    for method in ("ffba", "lora"):
        records |= _sweep_record(method, 1e-3, 0.5) | _sweep_record(method, 3e-2, 0.9)
    result = aggregate(spec, records)
    assert result["methods"]["ffba"]["rationale nll"]["average"]["mean"] == pytest.approx((1.5 + 0.5) / 2)
    difference = result["comparisons"]["ffba - lora"]["rationale nll"]
    assert difference["difference"] == pytest.approx(-0.75) and difference["ci95"][1] < 0  # every item lower
    table = format_aggregate(result)
    assert "- rationale nll: -0.75000" in table and "| ffba | 0.001 | 1 | 1 | 1.0000 +- 0.0000 | 1.0000 +- 0.0000 |" in table


def test_evaluations_are_checked_when_the_spec_is_read(tiny_model_dir, tiny_data_dir):
    with pytest.raises(ValueError, match=r"unknown keys \['limits'\]"):
        _spec(tiny_model_dir, tiny_data_dir, evaluations=[{"name": "x", "mode": "text", "limits": 3}])
    with pytest.raises(ValueError, match="unknown keys .* or mode"):
        _spec(tiny_model_dir, tiny_data_dir, evaluations=[{"name": "x", "mode": "rouge"}])
    with pytest.raises(ValueError, match="share a name or a metric"):
        _spec(tiny_model_dir, tiny_data_dir, evaluations=[{"name": "a", "mode": "text"}, {"name": "b", "mode": "text"}])
    for evaluation, message in (({"name": "a", "mode": "generate", "engine": "vllm"},
                                 r"evaluation 'a': engine 'vllm': choose one of \['transformers', 'slots'\]"),
                                ({"name": "a", "mode": "nll", "engine": "slots"},
                                 "evaluation 'a': engine 'slots': an engine decodes the answers of mode 'generate', not mode 'nll'"),
                                ({"name": "a", "mode": "text", "tasks": ["gsm8k"]},
                                 r"evaluation 'a': mode 'text' scores the choices of multiple-choice sets \(commonsense\) only"),
                                ({"name": "a", "mode": "nll", "tasks": ["gsm9k"]}, "evaluation 'a': unknown task 'gsm9k'")):
        with pytest.raises(ValueError, match=message):
            _spec(tiny_model_dir, tiny_data_dir, task="math", evaluations=[evaluation])


def test_a_missing_spec_file_is_named_with_the_fix(tmp_path, capsys):
    from fflora.cli import main

    with pytest.raises(FileNotFoundError, match=r"no study spec at .*nope.toml: give a TOML or JSON file"):
        StudySpec.load(tmp_path / "nope.toml")
    assert main(["study", str(tmp_path / "nope.toml")]) == 2
    assert capsys.readouterr().err.startswith(f"fflora: error: no study spec at {tmp_path / 'nope.toml'}")


def test_a_study_trains_every_cell_in_the_dtype_its_spec_names(tiny_model_dir, tiny_data_dir):
    for dtype in (None, "auto"):
        train = {"batch_size": 4} | ({"dtype": dtype} if dtype else {})
        with pytest.raises(ValueError, match=rf"train.dtype is {dtype!r}: a study trains every cell in one dtype"):
            _spec(tiny_model_dir, tiny_data_dir, train=train)
    spec = _spec(tiny_model_dir, tiny_data_dir, train={"dtype": "bfloat16"})
    assert {spec.train_config(Cell("sweep", m, 1e-3, 0), Path("r")).dtype for m in spec.methods} == {"bfloat16"}
    with pytest.raises(ValueError, match=r"primary/secondary name metrics the evaluations do not give: \['gold nlll'\]"):
        _spec(tiny_model_dir, tiny_data_dir, primary="gold nlll")


def test_every_spec_under_benchmarks_loads():
    from fflora.recipes.study import StudySpec

    specs = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("study-*.toml"))
    assert len(specs) >= 4
    for path in specs:
        assert StudySpec.load(path).train["dtype"] in ("float32", "bfloat16")


def test_until_is_the_next_occurrence_of_a_time_of_day():
    import datetime as dt

    from fflora.recipes.study.schedule import parse_until

    now = dt.datetime(2026, 12, 6, 23, 20)
    assert parse_until("23:50", now) == dt.datetime(2026, 12, 6, 23, 50)
    assert parse_until("01:50", now) == dt.datetime(2026, 12, 7, 1, 50)  # past midnight: tomorrow's
    assert parse_until("2026-12-08T03:00", now) == dt.datetime(2026, 12, 8, 3, 0)
    with pytest.raises(ValueError, match=r"--until '25:00': give a time of day as HH:MM"):
        parse_until("25:00", now)


def _timed(record, train_s, steps, evaluate_s=None):
    return record | {"timing": {"train_s": train_s, "steps_run": steps}
                     | ({"evaluate_s": evaluate_s} if evaluate_s is not None else {})}


def test_cell_estimates_come_from_the_measured_cells():
    from fflora.recipes.study.schedule import cell_seconds

    ffba = _timed(_sweep_record("ffba", 1e-3, 0.5)[Cell("sweep", "ffba", 1e-3, 0).key], 200.0, 100)  # 2 s/step
    lora = _timed(_sweep_record("lora", 1e-3, 0.5)[Cell("sweep", "lora", 1e-3, 0).key], 300.0, 100)  # 3 s/step
    base = _timed({"cell": {"phase": "base", "method": "base"}}, 0.0, 0, evaluate_s=500.0)
    assert cell_seconds("sweep", "ffba", 10, [ffba]) == 20.0
    assert cell_seconds("sweep", "lora", 10, [ffba, lora]) == 30.0  # the method's own speed
    assert cell_seconds("sweep", "fa", 10, [ffba, lora]) == 25.0    # else the median of all
    assert cell_seconds("final", "ffba", 10, [ffba]) is None        # no evaluation measured yet
    assert cell_seconds("final", "ffba", 10, [ffba, base]) == 520.0
    assert cell_seconds("base", "base", 0, [base]) == 500.0
    assert cell_seconds("sweep", "ffba", 10, []) is None
    # records written before `timing` existed: the run's own wall time per step, unless it was resumed
    old = {"cell": {"phase": "sweep", "method": "ffba"}, "train": {"wall_time_s": 400.0, "global_step": 100,
                                                                   "resumed_from": None}}
    assert cell_seconds("sweep", "ffba", 10, [old]) == 40.0
    assert cell_seconds("sweep", "ffba", 10, [old | {"train": old["train"] | {"resumed_from": "c-50"}}]) is None


def test_the_study_counts_its_measured_cells_and_estimates_the_rest():
    from fflora.recipes.study.schedule import study_seconds

    def cell(phase, method, steps, train_s, steps_run, evaluate_s=None):
        return _timed({"cell": {"phase": phase, "method": method}, "train": {"global_step": steps}},
                      train_s, steps_run, evaluate_s)

    records = {"sweep-ffba": cell("sweep", "ffba", 100, 200.0, 100),              # measured: 200 s
               "sweep-lora": cell("sweep", "lora", 100, 300.0, 100),              # measured: 300 s
               "base-model": cell("base", "base", 0, 0.0, 0, evaluate_s=500.0),   # measured: 500 s
               # resumed after 60 of its 100 steps: lora's 3 s a step and the median evaluation (475 s)
               "final-lora": cell("final", "lora", 100, 120.0, 40, evaluate_s=450.0),
               "base-old": {"cell": {"phase": "base", "method": "base"}, "train": {}}}  # no timing: 475 s
    total, estimated = study_seconds(records)
    assert estimated == ["final-lora", "base-old"]
    assert total == 200.0 + 300.0 + 500.0 + (100 * 3.0 + 475.0) + 475.0


def test_until_starts_only_cells_that_end_in_time(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """With 10 minutes left, a final cell measured at ~30 minutes is not started; the sweep cells that
    fit are, and the run then stops, saying so in the aggregate."""
    import datetime as dt

    import fflora.recipes.study.runner as study

    spec = _spec(tiny_model_dir, tiny_data_dir, seeds={"ffba": 1, "lora": 1}, learning_rates=[1e-3, 3e-2],
                 sweep_steps=10, final_steps=10)
    folder = tmp_path / "results" / "tiny"
    folder.mkdir(parents=True)
    measured = {**_sweep_record("ffba", 1e-3, 0.5), **_sweep_record("ffba", 3e-2, 0.9)}
    measured = {k: _timed(r, 300.0, 10) for k, r in measured.items()}  # 30 s per step: a sweep cell 5 min
    measured["base-model"] = _timed({"cell": {"phase": "base", "method": "base", "lr": None, "seed": None},
                                     "train": {"dev_loss": 1.0}}, 0.0, 0, evaluate_s=1500.0)
    for key, record in measured.items():
        (folder / f"{key}.json").write_text(json.dumps(record))
    ran, clock = [], [dt.datetime(2026, 12, 6, 23, 0)]

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return clock[0]

    def fake_run_cell(spec, cell, results_dir, runs_dir):  # each cell takes the 5 minutes measured
        ran.append(cell.key)
        clock[0] += dt.timedelta(minutes=5)
        record = _timed({"cell": {"phase": cell.phase, "method": cell.method, "lr": cell.lr, "seed": cell.seed},
                         "train": {"dev_loss": 0.7}}, 300.0, 10)
        (results_dir / f"{cell.key}.json").write_text(json.dumps(record))

    monkeypatch.setattr(study, "run_cell", fake_run_cell)
    monkeypatch.setattr(study, "aggregate", lambda spec, records: {"cells_done": len(records)})
    monkeypatch.setattr(study, "write_aggregate", lambda result, folder: None)
    monkeypatch.setattr(study.dt, "datetime", Clock)
    until = clock[0] + dt.timedelta(minutes=10)
    result = run_study(spec, tmp_path / "results", tmp_path / "runs", until=until)
    # the final FFBA cell (10 x 30 s + 25 min of evaluation) does not fit; one 5-minute sweep cell does,
    # a second would end after the deadline (with the margin)
    assert ran == ["sweep-lora-lr0.001-seed0"]
    assert result["runner"]["next"] == "final-ffba-lr0.001-seed0" and result["runner"]["next_estimate_s"] == 1800
    assert result["runner"]["left_s"] == 300 and result["runner"]["at"] == "2026-12-06T23:05:00"
    assert run_study(spec, tmp_path / "results", tmp_path / "runs", max_cells=1)["runner"] is None


def test_a_stopped_process_counts_its_pause_apart(tmp_path):
    """`kill -STOP` / `kill -CONT` on a process that times its work: the pause is taken out of its
    active time (the figure the study plans with)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import time\nfrom fflora.recipes.study.schedule import PauseWatch\n"
              "with PauseWatch(tick=0.05, gap=0.5) as w:\n    print('ready', flush=True)\n    time.sleep(3.0)\n"
              "print(round(w.wall(), 2), round(w.paused_s, 2), flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(2.0)
        os.kill(proc.pid, signal.SIGCONT)
        wall, paused = map(float, proc.stdout.readline().split())
    finally:
        proc.kill()
        proc.wait()
    assert wall >= 3.0 and 1.7 <= paused <= 2.3  # the 2 s stopped, not the 3 s of sleep


def test_decisions_follow_the_interval_and_the_margin(tiny_model_dir, tiny_data_dir):
    from fflora.recipes.study import decide, metrics_of

    spec = _spec(tiny_model_dir, tiny_data_dir, evaluations=[{"name": "text", "mode": "text"}], primary="gold nll",
                 secondary=["text acc_norm"])
    metrics = metrics_of(spec)

    def verdict(nll_ci, acc_ci, lora_gain=-0.4):
        comparisons = {"ffba - lora": {"gold nll": {"difference": sum(nll_ci) / 2, "ci95": nll_ci},
                                       "text acc_norm": {"difference": sum(acc_ci) / 2, "ci95": acc_ci}},
                       "lora - base": {"gold nll": {"difference": lora_gain}}}
        return {m: d["verdict"] for m, d in decide(spec, metrics, comparisons).items()}

    # NLL: lower is better; the margin is 5% of LoRA's gain (0.4 nats: +-0.02)
    assert verdict([-0.05, -0.01], [0.5, 2.0]) == {"gold nll": "better", "text acc_norm": "better"}
    assert verdict([0.01, 0.05], [-2.0, -0.5]) == {"gold nll": "worse", "text acc_norm": "worse"}
    assert verdict([-0.015, 0.019], [-0.9, 0.9]) == {"gold nll": "equivalent", "text acc_norm": "equivalent"}
    assert verdict([-0.03, 0.01], [-1.5, 0.5]) == {"gold nll": "undecided", "text acc_norm": "undecided"}
    assert verdict([-0.03, 0.01], [-0.5, 0.5], lora_gain=-1.0)["gold nll"] == "equivalent"  # margin 0.05
    decided = decide(spec, metrics, {"ffba - lora": {"gold nll": {"difference": 0.0, "ci95": [-0.01, 0.01]}}})
    assert decided["gold nll"]["verdict"] == "undecided" and decided["gold nll"]["margin"] is None  # no LoRA - base yet
    assert decided["gold nll"]["primary"] and "text acc_norm" not in decided
