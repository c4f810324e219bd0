"""`fflora bench train` on a tiny model: every configuration timed on the same tokens, both loss curves."""

import pytest

import fflora
from fflora.methods import has_adapter
from fflora.bench.settings import TrainBenchSettings
from fflora.bench.train import CONFIGS, format_train_table, run_train_bench, write_train_bench


def test_train_bench_times_every_configuration_and_runs_both_dtypes(tiny_model_dir, tiny_data_dir, tmp_path):
    model, tokenizer = fflora.load_base_model(tiny_model_dir)
    settings = TrainBenchSettings(rank=2, batch_size=2, max_length=1024, steps=1, curve_steps=2,
                                  model=str(tiny_model_dir), data_dir=str(tiny_data_dir))
    result = run_train_bench(model, tokenizer, settings)
    assert not has_adapter(model)  # the adapters went on copies: the base model is left as it was
    for form in ("instruction", "cloze"):
        t = result["throughput"][form]
        assert set(t["configs"]) == set(CONFIGS) and t["tokens"] <= t["padded_positions"]
        assert t["configs"]["first_study"]["vs_first_study"] == pytest.approx(1.0)
        assert all(c["tokens_per_s"] == pytest.approx(t["tokens"] / c["seconds_per_step"]) for c in t["configs"].values())
    curves = result["loss_curves"]
    assert [len(c["loss"]) for c in curves["curves"].values()] == [2, 2]
    assert curves["max_abs_difference"] == max(abs(a - b) for a, b in zip(*(c["loss"] for c in curves["curves"].values())))
    table = format_train_table(result)
    assert "| cloze |" in table and "bf16_packed" in table and "max |fp32 - bf16|" in table
    out = write_train_bench(result, tmp_path / "bench")
    assert {p.name for p in out.iterdir()} == {"train.json", "train.md", "train.png"}
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        TrainBenchSettings(steps=0)
