"""`fflora bench formats` (alias `peers`): fflora's weight formats next to the compiled stock and LoRA peers
and llama.cpp, with agreement, bytes per token and the targets."""

import pytest
import torch
from conftest import make_model
from test_server import _tokenizer

from fflora.bench import llama_cpp
from fflora.bench.formats import check_targets, format_formats_table, run_formats_bench, write_formats_bench
from fflora.bench.settings import KINDS, FormatsBenchSettings
from fflora.cli import main

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


def test_every_format_and_kind_with_the_peers_in_their_formats(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_cpp, "llama_cpp", None)  # as on a machine without `make bench-peers`
    formats = ("float32", "bfloat16", "int8") if AVX512 else ("float32", "bfloat16")
    settings = FormatsBenchSettings(formats=formats, batch_sizes=(1, 2), prompt_len=8, new_tokens=4, repeats=1, rank=4,
                                    compile=False, gemm_plan="transposed")  # a plan that measures nothing
    base = make_model("llama")
    result = run_formats_bench(base, _tokenizer(), settings)
    keys = [f"{w}/{k}" for w in formats for k in KINDS if w in ("float32", "bfloat16") or not k.endswith("_compiled")]
    assert list(result["agreement"]) == keys and list(result["latency"]["2"]) == keys == list(result["latency"]["1"])
    # the stock float32 model is the reference of the base kinds; each adapter kind's is its own float32 model
    assert result["agreement"]["float32/base_compiled"] == 1.0 and result["agreement"]["float32/ffba_fused"] == 1.0
    assert result["agreement"]["float32/fused_base"] > 0.9 and result["agreement"]["float32/lora_unmerged_compiled"] == 1.0
    assert result["agreement"]["float32/bank_fused"] == 1.0 and result["agreement"]["bfloat16/bank_fused"] > 0.5
    assert result["weight_bytes"]["bfloat16/base_compiled"] < 0.55 * result["weight_bytes"]["float32/base_compiled"]
    assert result["weight_bytes"]["float32/lora_unmerged_compiled"] > result["weight_bytes"]["float32/base_compiled"]
    assert result["lora_rank"] >= 1 and result["llama_cpp"] == {
        "skipped": "llama-cpp-python is not installed (`make bench-peers` installs it)"}
    targets = result["targets"]
    assert "float32/ffba_fused / float32/lora_unmerged_compiled @ batch 2" in targets
    assert targets["float32/bank_fused / float32/fused_base @ batch 2"]["limit"] == 1.10
    assert not any("llama_cpp" in name for name in targets)
    ratio = targets["bfloat16/ffba_fused / bfloat16/fused_base @ batch 1"]
    cells = result["latency"]["1"]
    assert ratio["value"] == cells["bfloat16/ffba_fused"]["tpot"]["median"] / cells["bfloat16/fused_base"]["tpot"]["median"]
    assert ratio["limit"] == 1.03 and ratio["met"] == (ratio["value"] <= 1.03)
    assert targets["bfloat16/ffba_fused agreement"]["limit"] == 0.97
    table = format_formats_table(result)
    assert "| bfloat16 | lora_unmerged_compiled | 2 |" in table and "| bfloat16 | ffba_fused | 2 |" in table
    assert "llama.cpp rows left out: llama-cpp-python is not installed (`make bench-peers` installs it)." in table
    assert "| float32/ffba_fused / float32/lora_unmerged_compiled @ batch 1 |" in table
    write_formats_bench(result, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"formats.json", "formats.md", "formats.png"}


def test_targets_against_llama_cpp_are_checked_at_batch_1_with_int4_held_to_1x():
    cell = lambda ms: {"tpot": {"median": ms / 1e3}}  # noqa: E731
    result = {"latency": {"1": {"int4/ffba_fused": cell(9.0), "int4/llama_cpp": cell(8.0), "int8/ffba_fused": cell(11.0),
                                "int8/llama_cpp": cell(9.0)}}, "agreement": {"int4/ffba_fused": 0.89}}
    targets = check_targets(result)
    assert targets["int4/ffba_fused / int4/llama_cpp @ batch 1"] == {"value": 9.0 / 8.0, "limit": 1.0, "met": False}
    assert targets["int8/ffba_fused / int8/llama_cpp @ batch 1"] == {"value": 11.0 / 9.0, "limit": 1.25, "met": True}
    assert targets["int4/ffba_fused agreement"] == {"value": 0.89, "limit": 0.90, "met": False}


def test_bad_formats_bench_settings_are_refused():
    with pytest.raises(ValueError, match="must include 'float32'"):
        FormatsBenchSettings(formats=("bfloat16",))
    with pytest.raises(ValueError, match=r"kinds must be among \['fused_base', 'ffba_fused', 'zflora_fused', 'bank_fused', "
                                         r"'base_compiled', 'lora_unmerged_compiled'\], got \['lora'\]"):
        FormatsBenchSettings(kinds=("lora",))
    with pytest.raises(ValueError, match="lora-rank must be an integer >= 1, got 0"):
        FormatsBenchSettings(lora_rank=0)
    with pytest.raises(ValueError, match=r"gemm-plan must be one of \['standard', 'transposed', 'packed', 'auto'\], got 'fast'"):
        FormatsBenchSettings(gemm_plan="fast")


def test_the_peers_alias_runs_the_formats_bench(capsys):
    assert main(["bench", "peers", "--formats", "bfloat16"]) == 2
    assert "formats must include 'float32'" in capsys.readouterr().err
