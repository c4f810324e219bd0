import json

import pytest

from fflora.jobs import demo
from fflora.bench.settings import CONFIGS


def test_quick_demo_on_a_tiny_model_writes_the_report(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "prepare", lambda tasks, data_dir: None)  # the tiny data is already there
    monkeypatch.setattr(demo, "QUICK", demo.DemoSizes(train_limit=16, max_steps=2, eval_limit=2, bench=dict(
        prompt_len=8, new_tokens=3, batch_sizes=(1,), repeats=1, train_steps=1, train_len=8, train_batch=2)))
    out = tmp_path / "demo"
    summary = demo.run_demo(out, quick=True, model=str(tiny_model_dir), data_dir=str(tiny_data_dir))
    assert json.loads((out / "summary.json").read_text()) == summary
    assert list(summary["cloze"]) == ["base", "ffba", "zflora", "lora"] and summary["eval_limit"] == 2
    assert summary["training"]["ffba"]["global_step"] == 2 and summary["training"]["zflora"]["global_step"] == 2
    assert all(t["tokens_per_s"] > 0 and t["dtype"] in ("float32", "bfloat16") for t in summary["training"].values())
    assert set(summary["tpot_ratio_to_base"]["1"]) == set(CONFIGS)
    for name in ("report.md", "accuracy.png", "bench.png", "bench.json", "base/eval.json", "ffba/eval.json",
                 "zflora/eval.json", "lora/eval.json"):
        assert (out / name).is_file(), name
    # every method scored on the same items as the base model, with the gold answers' NLL
    base = json.loads((out / "base" / "eval.json").read_text())
    assert summary["cloze"]["base"]["nll"] == base["nll_average"] > 0
    for method in ("ffba", "zflora", "lora"):
        assert summary["cloze"][method]["sets"].keys() == summary["cloze"]["base"]["sets"].keys()
    # Tiny sets: boolq, piqa and winogrande have two choices, the other five four.
    assert summary["chance"]["average"] == pytest.approx((3 * 50 + 5 * 25) / 8)
    report = (out / "report.md").read_text()
    assert report.startswith("# fflora demo (quick") and "| ffba |" in report and "| zflora |" in report
    assert "| base model (no training) | 0 |" in report and "| chance (same items) |" in report
    assert "What a run this short can show" in report and "## Latency" in report
    assert report in capsys.readouterr().out
