import json

from fflora import demo
from fflora.bench.latency import CONFIGS


def test_quick_demo_on_a_tiny_model_writes_the_report(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "prepare", lambda tasks, data_dir: None)  # the tiny data is already there
    monkeypatch.setattr(demo, "QUICK", demo.DemoSizes(train_limit=16, max_steps=2, eval_limit=2, bench=dict(
        prompt_len=8, new_tokens=3, batch_sizes=(1,), repeats=1, train_steps=1, train_len=8, train_batch=2)))
    out = tmp_path / "demo"
    summary = demo.run_demo(out, quick=True, model=str(tiny_model_dir), data_dir=str(tiny_data_dir))
    assert json.loads((out / "summary.json").read_text()) == summary
    assert list(summary["accuracy"]) == ["ffba", "zflora", "lora"] and summary["eval_limit"] == 2
    assert summary["training"]["ffba"]["global_step"] == 2 and summary["training"]["zflora"]["global_step"] == 2
    assert set(summary["tpot_ratio_to_base"]["1"]) == set(CONFIGS)
    for name in ("report.md", "accuracy.png", "bench.png", "bench.json", "ffba/eval.json", "zflora/eval.json",
                 "lora/eval.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert report.startswith("# fflora demo (quick") and "| ffba |" in report and "| zflora |" in report and "## Latency" in report
    # The tiny sets' first two items have labels 0 and 1: always answering 0 is right half the time.
    assert summary["best_constant"] == {"average": 50.0, **dict.fromkeys(summary["best_constant"].keys() - {"average"}, 50.0)}
    assert "| best constant label (same items) | | | | 50.0 |" in report
    assert report in capsys.readouterr().out
