import json
import subprocess
import sys

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


def test_generate_takes_a_run_folder_and_a_lora_adapter(tiny_model_dir, tmp_path, capsys):
    """One rule for adapter paths: the run folder `fflora train` writes or the adapter folder in it;
    LoRA through PEFT, merged by default (the same tokens as unmerged), with the fast-path flags refused."""
    from peft import LoraConfig, get_peft_model

    model, _ = fflora.load_base_model(tiny_model_dir)
    fflora.apply_ffba(model, fflora.FFBAConfig(r=4))
    randomize_adapters(model)
    fflora.save_adapter(model, tmp_path / "run" / "adapter")
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", "abc", "--max-new-tokens", "5", "--adapter"]
    assert main(args + [str(tmp_path / "run" / "adapter")]) == 0
    from_adapter = capsys.readouterr()
    assert main(args + [str(tmp_path / "run")]) == 0
    from_run = capsys.readouterr()
    assert from_run.out == from_adapter.out and "ffba: " in from_run.err and " tokens/s)" in from_run.err

    lora = get_peft_model(fflora.load_base_model(tiny_model_dir)[0], LoraConfig(r=2, target_modules="all-linear"))
    for name, p in lora.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.3)
    lora.save_pretrained(tmp_path / "lora")
    assert main(args + [str(tmp_path / "lora")]) == 0
    merged = capsys.readouterr()
    assert "LoRA adapter through PEFT, merged into the base weights" in merged.err
    assert main(args + [str(tmp_path / "lora"), "--unfused"]) == 0
    unmerged = capsys.readouterr()
    assert unmerged.out == merged.out and "unmerged" in unmerged.err
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "abc", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out != merged.out  # the adapter changed the tokens
    assert main(args + [str(tmp_path / "lora"), "--compile", "on"]) == 2
    assert "is a LoRA adapter: --gemm-plan, --compile and --weights apply to fflora's fused form" in capsys.readouterr().err


def test_a_warning_on_the_command_line_is_one_line_without_python_source(tiny_model_dir, tmp_path, capsys):
    model = fflora.apply_ffba(fflora.load_base_model(tiny_model_dir)[0], fflora.FFBAConfig(r=2))
    fflora.save_adapter(model, tmp_path / "adapter")
    other = tmp_path / "other-base"
    reweighted = fflora.load_base_model(tiny_model_dir)[0]
    reweighted.lm_head.weight.data.add_(1.0)
    reweighted.save_pretrained(other)
    fflora.load_base_model(tiny_model_dir)[1].save_pretrained(other)
    done = subprocess.run([sys.executable, "-m", "fflora.cli", "generate", "--model", str(other), "--adapter",
                           str(tmp_path / "adapter"), "--prompt", "a", "--max-new-tokens", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "warn" in line.lower()]
    assert len(warning) == 1 and warning[0].startswith("fflora: warning: the adapter at ")
    assert "other weights" in warning[0]


def test_cli_errors_are_one_clear_line(tiny_model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "nope"), "--prompt", "a"]) == 2
    assert f"fflora: error: {tmp_path / 'nope'} holds no trained result" in capsys.readouterr().err
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
    assert main(["serve", "--model", str(tiny_model_dir), "--max-num-seqs", "0"]) == 2
    assert "fflora: error: --max-num-seqs must be >= 1, got 0" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model_dir), "--max-model-len", "0"]) == 2
    assert "fflora: error: --max-model-len must be >= 1, got 0" in capsys.readouterr().err


def test_train_flags_are_checked_before_any_data_or_model_is_read(tmp_path, capsys):
    """A bad flag names itself at once (the data folder and the model do not exist: never reached)."""
    common = ["train", "--method", "ffba", "--task", "commonsense", "--output-dir", str(tmp_path / "out"),
              "--data-dir", str(tmp_path / "no-data"), "--model", str(tmp_path / "no-model")]
    for flags, message in ((["--rank", "0"], "--rank must be an integer >= 1, got 0"),
                           (["--lr", "0"], "--lr must be > 0, got 0.0"),
                           (["--batch-size", "-2"], "--batch-size must be an integer >= 1, got -2"),
                           (["--max-steps", "0"], "--max-steps must be >= 1, or -1 to train for --epochs; got 0"),
                           (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5")):
        assert main(common + flags) == 2
        assert capsys.readouterr().err.strip() == f"fflora: error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "ffba", "--task", "math", "--output-dir", "x", "--rank", "0"], "--rank must be an integer >= 1"),
    (["compare", "--methods", "ffba", "--task", "math", "--output-dir", "x"], "--methods takes two or more"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs must be >= 1, got 0"),
    (["serve", "--adapter", "nameonly"], "--adapter takes NAME=PATH"),
    (["eval", "--task", "gsm9k"], "unknown task 'gsm9k'; known tasks are"),
    (["eval", "--task", "gsm8k", "--mode", "nll", "--engine", "slots"],
     "engine 'slots': an engine decodes the answers of mode 'generate', not mode 'nll'"),
    (["eval", "--task", "math", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["eval", "--task", "math", "--adapter", "runs/x", "--method", "base"], "give either --adapter DIR or --method base"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["generate", "--prompt", "hi", "--unfused", "--compile", "on"], "--gemm-plan, --compile and --weights apply to the fused form"),
    (["serve", "--port", "99999"], "--port must be between 0 and 65535 (0: a free one, said at start), got 99999"),
    (["train", "--method", "ffba", "--task", "math", "--output-dir", "x", "--model", "./no-such-folder"],
     "no model folder at './no-such-folder'"),
    (["generate", "--model", "./no-such-folder", "--prompt", "hi"], "is not a folder here, not one of the embedded models"),
])
def test_bad_settings_fail_before_torch_loads(argv, message):
    """train, compare, eval, generate and serve check their settings before the command's modules (and PyTorch) load."""
    code = f"import sys\nfrom fflora.cli import main\nprint(main({argv!r}), 'torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == ["2", "False"], run.stderr[-2000:]
    assert run.stderr.startswith("fflora: error: ") and message in run.stderr


def test_ctrl_c_ends_a_command_with_one_line_and_the_status_of_sigint(monkeypatch, capsys):
    from fflora.cli import commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "cmd_params", interrupted)
    assert main(["params"]) == 130
    assert capsys.readouterr().err == "fflora: interrupted\n"


def test_train_help_gives_every_option_a_description_and_default():
    import argparse

    from fflora.cli import build_parser

    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    undocumented = [a.option_strings[0] for a in train._actions if a.option_strings and not a.help]
    assert not undocumented, undocumented
    for flag in ("--lr", "--batch-size", "--max-steps", "--max-length", "--logging-steps"):
        action = next(a for a in train._actions if flag in a.option_strings)
        assert "default" in action.help, flag


def test_version_names_fflora_and_torch(capsys):
    from fflora.utils.version import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"fflora {__version__} (torch ")
