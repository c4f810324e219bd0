import json

import pytest
from conftest import randomize_adapters

import fflora
from fflora.cli import main


def test_params_prints_ffba_and_zflora_next_to_lora(tiny_model_dir, capsys):
    assert main(["params", "--model", str(tiny_model_dir), "--rank", "2", "--lora-rank", "2"]) == 0
    out = capsys.readouterr().out
    config = fflora.load_base_model(tiny_model_dir)[0].config
    lora = fflora.lora_parameter_count(config, 2)
    ffba = fflora.ffba_parameter_count(config, fflora.FFBAConfig(r=2))
    zflora = fflora.zflora_parameter_count(config, fflora.ZFLoRAConfig(r=2))
    assert f"FFBA        2 {ffba:>17,} {ffba / lora:>7.3f}" in out
    assert f"zFLoRA      2 {zflora:>17,} {zflora / lora:>7.3f}" in out
    assert f"LoRA        2 {lora:>17,}   1.000" in out


@pytest.mark.parametrize("method", ["ffba", "zflora"])
def test_verify_reports_fused_equivalence(method, tiny_model_dir, capsys):
    assert main(["verify", "--model", str(tiny_model_dir), "--method", method, "--rank", "4", "--init-std", "0.05",
                 "--max-new-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter"] == f"random (std 0.05), {method} r=4"
    assert result["greedy_tokens_equal"] is True
    assert result["max_abs_logit_diff"] < 1e-4
    assert result["max_abs_adapter_effect"] > 1e-3


def test_generate_with_adapter_fused_equals_unfused(tiny_model_dir, tmp_path, capsys):
    model, _ = fflora.load_base_model(tiny_model_dir)
    fflora.apply_ffba(model, fflora.FFBAConfig(r=4))
    randomize_adapters(model)
    fflora.save_adapter(model, tmp_path / "adapter")
    args = ["generate", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"), "--prompt", "abc", "--max-new-tokens", "5"]
    assert main(args) == 0
    fused = capsys.readouterr().out
    assert main(args + ["--unfused"]) == 0
    assert capsys.readouterr().out == fused
    assert main(args + ["--gemm-plan", "auto"]) == 0
    assert capsys.readouterr().out == fused
    assert main(args + ["--compile", "on"]) == 0
    assert capsys.readouterr().out == fused
    assert fused.startswith("### abc\n")
    assert main(args + ["--unfused", "--compile", "on"]) == 2
    assert capsys.readouterr().err.strip() == ("fflora: error: --gemm-plan, --compile and --weights apply to the fused form; "
                                               "drop --unfused, or them")


def test_cli_errors_are_one_clear_line(tiny_model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "nope"), "--prompt", "a"]) == 2
    assert "fflora: error: no fflora adapter at" in capsys.readouterr().err
    assert main(["params", "--model", str(tiny_model_dir), "--rank", "0"]) == 2
    assert "FFBAConfig.r must be an integer >= 1" in capsys.readouterr().err


def test_bench_bank_runs_from_the_command_line_and_refuses_bad_sizes(tiny_model_dir, tmp_path, capsys):
    assert main(["bench", "bank", "--batch-sizes", "0"]) == 2
    assert "fflora: error: batch-sizes must be integers >= 1, got [0]" in capsys.readouterr().err
    out_dir = tmp_path / "bank"
    args = ["bench", "bank", "--model", str(tiny_model_dir), "--rank", "2", "--batch-sizes", "2", "--resident", "2",
            "--mixes", "distinct", "--prompt-len", "4", "--steps", "1", "--rounds", "1", "--output-dir", str(out_dir)]
    assert main(args) == 0
    assert "| 2 | distinct | 2 |" in capsys.readouterr().out
    assert [c["mix"] for c in json.loads((out_dir / "bank.json").read_text())["cells"]] == ["distinct"]


def test_serve_refuses_bad_adapters_before_listening(tiny_model_dir, tmp_path, capsys):
    assert main(["serve", "--model", str(tiny_model_dir), "--adapter", "nameonly"]) == 2
    assert "fflora: error: --adapter takes NAME=PATH, got 'nameonly'" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model_dir), "--adapter", f"a={tmp_path}", "--adapter", f"a={tmp_path}"]) == 2
    assert "--adapter 'a' is given twice" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model_dir), "--adapter", f"a={tmp_path / 'none'}"]) == 2
    assert f"fflora: error: no fflora adapter at {tmp_path / 'none'}" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model_dir), "--kv-cache-tokens", "0"]) == 2
    assert "fflora: error: --kv-cache-tokens must be >= 1, got 0" in capsys.readouterr().err
