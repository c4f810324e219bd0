"""The multi-adapter benchmark: its adapter mixes, its baselines' correctness, and its report."""

import json
import random
import statistics
from collections import Counter

import pytest
import torch
from conftest import make_model

from fflora.bench.bank import (
    METHODS,
    BankBenchSettings,
    assign_adapters,
    check_bank_targets,
    format_bank_table,
    gather_lora_from_peft,
    gather_rows,
    peft_with_adapters,
    run_bank_bench,
    write_bank_bench,
)


def test_adapter_mixes_follow_punicas_patterns():
    rng = random.Random(0)
    assert assign_adapters("identical", 5, 4, rng) == [0] * 5
    assert assign_adapters("distinct", 6, 4, rng) == [0, 1, 2, 3, 0, 1]
    uniform = assign_adapters("uniform", 400, 4, rng)
    assert set(uniform) == {0, 1, 2, 3} and max(Counter(uniform).values()) < 140
    zipf = Counter(assign_adapters("zipf", 400, 4, rng, zipf_alpha=1.5))
    assert zipf[0] > zipf[1] > zipf[3] and zipf[0] > 200  # 1 / (1 + 2^-1.5 + 3^-1.5 + 4^-1.5) = 0.66
    with pytest.raises(ValueError, match="unknown adapter mix 'skewed'"):
        assign_adapters("skewed", 2, 2, rng)


@torch.no_grad()
def test_gather_lora_baseline_computes_what_peft_mixed_batches_compute():
    base = make_model("llama")
    peft_model = peft_with_adapters(base, lora_rank=3, count=3, seed=0)
    gather = gather_lora_from_peft(base, peft_model, ["a0", "a1", "a2"])
    ids = torch.randint(3, 128, (4, 7), generator=torch.Generator().manual_seed(0))
    rows = [2, 0, 2, 1]
    expected = peft_model(input_ids=ids, adapter_names=[f"a{k}" for k in rows]).logits
    with gather_rows(rows):
        got = gather(input_ids=ids).logits
    assert (got - expected).abs().max().item() < 1e-5
    assert (expected[0] - base(ids[:1]).logits[0]).abs().max().item() > 1e-3  # the adapters do something


def test_bank_bench_measures_every_cell_and_method(tmp_path):
    settings = BankBenchSettings(batch_sizes=(2, 1), resident=(2, 1), rank=2, prompt_len=4, steps=1, rounds=2)
    assert settings.batch_sizes == (1, 2) and settings.resident == (1, 2)
    result = run_bank_bench(make_model("llama"), settings)
    cells = {(c["resident"], c["batch"], c["mix"]) for c in result["cells"]}
    assert cells == {(1, 1, "identical"), (1, 2, "identical")} | {(2, b, m) for b in (1, 2) for m in settings.mixes}
    for c in result["cells"]:
        assert list(c["tpot_s"]) == list(METHODS)
        assert all(t["n"] == 2 and 0 < t["min"] <= t["median"] <= t["max"] for t in c["tpot_s"].values())
        assert c["adapters_present"] == len(set(c["rows"])) and len(c["rows"]) == c["batch"]
        rounds = c["rounds_s"]
        assert c["tpot_s"]["bank"]["median"] == statistics.median(rounds["bank"])
        paired = sorted(b / f for b, f in zip(rounds["bank"], rounds["fused_base"]))
        assert c["ratios"]["bank_over_fused_base"] == pytest.approx((paired[0] + paired[1]) / 2)
    assert result["lora_rank"] >= 1 and result["targets"] == {}  # no batch-8 cells
    out = write_bank_bench(result, tmp_path / "bank")
    assert json.loads((out / "bank.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "bank.png").stat().st_size > 1000
    assert "| K resident | mix | adapters in batch |" in (out / "bank.md").read_text()


def _cell(resident, mix, bank, base, peft, batch=8):
    tpot = {m: {"median": v} for m, v in zip(METHODS, (base, bank, peft, 2 * bank))}
    return {"resident": resident, "batch": batch, "mix": mix, "tpot_s": tpot,
            "ratios": {"bank_over_fused_base": bank / base, "peft_mixed_over_bank": peft / bank, "gather_lora_over_bank": 2.0}}


def test_targets_are_checked_on_the_batch_8_cells():
    cells = [_cell(8, "distinct", bank=1.10, base=1.0, peft=1.60), _cell(1, "identical", bank=1.04, base=1.0, peft=1.2),
             _cell(8, "identical", bank=1.06, base=1.0, peft=1.2), _cell(8, "distinct", bank=9.0, base=1.0, peft=1.0, batch=4)]
    t = check_bank_targets(cells)
    assert t["distinct8_bank_over_fused_base"] == pytest.approx(1.10) and t["distinct8_within_1.15"]
    assert t["distinct8_peft_mixed_over_bank"] == pytest.approx(1.60 / 1.10) and not t["distinct8_bank_1.5x_faster_than_peft"]
    assert t["identical_worst_bank_over_fused_base"] == pytest.approx(1.06) and not t["identical_within_1.05"]
    table = format_bank_table({"ffba_rank": 8, "lora_rank": 7, "threads": 2, "cells": [],
                               "settings": {"prompt_len": 32, "batch_sizes": [], "rounds": 3, "steps": 8}, "targets": t})
    assert "bank / fused base = 1.100 (met: <= 1.15); PEFT mixed / bank = 1.45 (NOT met: >= 1.5)" in table


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_sizes": (0,)}, r"batch-sizes must be integers >= 1, got \[0\]"),
    ({"resident": ()}, r"resident must be integers >= 1, got \[\]"),
    ({"mixes": ("skewed",)}, r"mixes must be among \['identical', 'uniform', 'zipf', 'distinct'\]"),
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BankBenchSettings(**kwargs)
