import json

import torch
from conftest import make_model

import fflora
from fflora.bench.latency import EAGER_CONFIGS, format_bench_table, run_bench, write_bench
from fflora.bench.settings import BenchSettings
from fflora.models.footprint import tensor_bytes
from fflora.methods import adapter_state_dict, load_adapter_state


def _settings(**kw):
    base = dict(prompt_len=8, new_tokens=4, batch_sizes=(1, 2), repeats=2, warmup=1, rank=2,
                train_steps=1, train_batch=2, train_len=8, configs=EAGER_CONFIGS)
    base.update(kw)
    return BenchSettings(**base)


def test_bench_reports_every_configuration_with_sane_numbers(tmp_path):
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_bench(model, _settings())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base is left as it was
    for batch in ("1", "2"):
        per = result["latency"][batch]
        assert list(per) == list(EAGER_CONFIGS)
        for r in per.values():
            assert r["ttft"]["n"] == 2 and r["tpot"]["n"] == 2
            assert 0 < r["tpot"]["min"] <= r["tpot"]["median"] <= r["tpot"]["max"]
            assert r["ttft"]["median"] > 0 and r["weight_bytes"] > 0 and r["fraction_of_copy_bandwidth"] > 0
    assert result["copy_bandwidth_bytes_per_s"] > 1e8
    targets = result["targets"]["1"]
    per = result["latency"]["1"]
    assert list(targets) == ["fused_base / base", "ffba_fused / fused_base", "zflora_fused / fused_base",
                             "ffba_fused_fast / base", "ffba_fused_fast / lora_unmerged"]
    plans = result["fast_path_plans"]
    assert set(plans) == {"fused_base_fast", "ffba_fused_fast", "zflora_fused_fast"}
    assert all(set(per) == {"1", "2"} for per in plans.values())
    assert all(r["mode"] == "auto" and r["rows"] == [int(b)] and r["measured"] for per in plans.values() for b, r in per.items())
    zflora = targets["zflora_fused / fused_base"]
    assert zflora["ratio"] == per["zflora_fused"]["tpot"]["median"] / per["fused_base"]["tpot"]["median"]
    assert zflora["limit"] == 1.02 and zflora["met"] == (zflora["ratio"] <= 1.02)
    assert set(result["train_step_s"]) == {"ffba", "zflora", "lora"} and result["train_step_s"]["zflora"]["median"] > 0
    assert set(result["adapter_switch_s"]) == {"ffba_fused", "zflora_fused", "lora_merged"}
    budget = result["budget"]
    assert budget["ffba_params"] == fflora.ffba_parameter_count(model.config, fflora.FFBAConfig(r=2))
    assert budget["zflora_params"] == fflora.zflora_parameter_count(model.config, fflora.ZFLoRAConfig(r=2))
    out = write_bench(result, tmp_path / "bench")
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_bench_table(result)
    assert "| ffba_fused |" in table and "**batch 2**" in table and "| adapter switch" in table
    assert "| zflora_fused |" in table and "Targets (TPOT ratios): fused_base / base = " in table
    assert "zflora_fused / fused_base = " in table and "ffba_fused_fast, batch 2: GEMM plan auto (" in table and "| training step (median s) | ffba | zflora | lora |" in table


@torch.no_grad()
def test_configurations_that_never_write_the_base_weights_share_them():
    """One copy of the base weights for the eager configurations that only read them; merged LoRA gets its
    own seven projections (it writes them; the rest shared) and the fast path (which re-lays the LM head
    out) its own everything; a latency run leaves the base as it was."""
    from fflora.bench.latency import SHARES_BASE_WEIGHTS, bench_latency, build_configs

    base = make_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.randint(10, base.config.vocab_size, (1, 6))
    reference = base(ids).logits
    settings = _settings(batch_sizes=(1,), repeats=1, configs=("base", "lora_unmerged", "lora_merged", "ffba_fused",
                                                                "fused_base_fast"))
    models = build_configs(base, settings, lora_rank=2)
    head = base.lm_head.weight.data_ptr()
    embed = base.model.embed_tokens.weight
    for name, model in models.items():
        shares = any(p is embed for p in model.parameters())
        assert shares == (name in SHARES_BASE_WEIGHTS or name == "lora_merged"), name
    merged = models["lora_merged"].model.layers[0]
    assert merged.self_attn.q_proj.weight is not base.model.layers[0].self_attn.q_proj.weight
    assert merged.input_layernorm.weight is base.model.layers[0].input_layernorm.weight
    q = models["lora_unmerged"].get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert q is base.model.layers[0].self_attn.q_proj.weight
    bench_latency(models, settings, base.config.vocab_size, {}, {})
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert base.lm_head.weight.data_ptr() == head and torch.equal(models["base"](ids).logits, reference)


def test_bench_compiles_the_compiled_configurations_per_batch_size():
    configs = ("base", "base_compiled", "lora_unmerged_compiled", "ffba_fused_compiled")
    result = run_bench(make_model("llama"), _settings(batch_sizes=(1,), configs=configs))
    per = result["latency"]["1"]
    assert list(per) == list(configs) and all(per[c]["tpot"]["n"] == 2 for c in configs)
    assert list(result["fast_path_plans"]) == ["ffba_fused_compiled"]  # the peers run as their users run them
    report = result["fast_path_plans"]["ffba_fused_compiled"]["1"]
    assert report["mode"] == "auto" and report["seconds"] > 0
    assert list(result["compile_s"]) == list(configs[1:]) and all(s["1"] > 0 for s in result["compile_s"].values())
    assert list(result["targets"]["1"]) == ["ffba_fused_compiled / base", "ffba_fused_compiled / lora_unmerged_compiled"]
    table = format_bench_table(result)
    assert "ffba_fused_compiled, batch 1: GEMM plan auto (" in table
    assert "lora_unmerged_compiled: compiled in " in table and "| base_compiled |" in table


def test_weight_bytes_count_tied_and_fused_tensors_once():
    model = make_model("llama")  # tied embeddings
    plain = tensor_bytes(model)
    assert plain == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    fflora.fuse(model)
    assert tensor_bytes(model) == plain  # the fused matrices replace the projections, nothing doubles


@torch.no_grad()
def test_swapping_an_adapter_in_place_matches_loading_it_fresh(tmp_path):
    model = fflora.apply_ffba(make_model("gemma3_text"), fflora.FFBAConfig(r=2))
    fflora.fuse(model)
    base_blocks = {n: b.clone() for n, b in model.named_buffers() if "ffba_fused" in n}
    pointers = {n: b.data_ptr() for n, b in model.named_buffers()}
    gen = torch.Generator().manual_seed(7)
    new = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in adapter_state_dict(model).items()}
    load_adapter_state(model, new)
    assert {n: b.data_ptr() for n, b in model.named_buffers()} == pointers  # nothing rebuilt or reallocated
    for name, module in model.named_modules():
        if hasattr(module, "widths"):  # fused input group: the base block is untouched
            rows, cols = sum(module.widths), module.d_in
            assert torch.equal(module.storage.weight[:rows, :cols], base_blocks[f"{name}.storage.weight"][:rows, :cols])
    fresh = fflora.apply_ffba(make_model("gemma3_text"), fflora.FFBAConfig(r=2))
    load_adapter_state(fresh, new)
    ids = torch.randint(3, 128, (2, 7), generator=gen)
    assert (model(ids).logits - fresh(ids).logits).abs().max().item() < 1e-4


def test_bad_bench_options_are_one_line_errors_before_any_work(capsys):
    import pytest

    from fflora.cli import main

    for args, message in ((["--batch-sizes", "0"], "batch-sizes must be integers >= 1, got [0]"),
                          (["--repeats", "0"], "repeats must be an integer >= 1, got 0"),
                          (["--lora-rank", "0"], "lora-rank must be an integer >= 1, got 0"),
                          (["--warmup", "-1"], "warmup must be >= 0, got -1")):
        assert main(["bench", *args]) == 2
        assert capsys.readouterr().err.strip() == f"fflora: error: {message}"
    with pytest.raises(ValueError, match=r"configs must be among \['base', 'base_compiled', 'fused_base'"):
        BenchSettings(configs=("merged",))
    with pytest.raises(ValueError, match=r"configs must include 'base' \(every ratio is to it\), got \['ffba_fused'\]"):
        BenchSettings(configs=("ffba_fused",))
    with pytest.raises(ValueError, match=r"gemm-plan must be one of \['standard', 'transposed', 'packed', 'auto'\], got 'rows'"):
        BenchSettings(gemm_plan="rows")
