"""The fine-tuning recipe on a tiny model and tiny in-test data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fflora
import fflora.recipes.data
from fflora.methods.serialization import WEIGHTS_NAME
from fflora.recipes.budget import match_adapter_rank
from fflora.recipes.settings import TrainConfig
from fflora.recipes.train import LossSpikeError, NonFiniteLossError, train


def _cfg(tiny_model_dir, tiny_data_dir, out, **kw):
    base = dict(method="ffba", task="commonsense", output_dir=str(out), model=str(tiny_model_dir),
                data_dir=str(tiny_data_dir), r=4, alpha=8, max_steps=6, batch_size=4, lr=1e-2,
                max_length=1024, save_steps=3, logging_steps=1, warmup_ratio=0.0, dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def _logged_losses(out):
    return [r["loss"] for r in map(json.loads, (out / "logs.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("method", ["ffba", "zflora"])
def test_adapter_training_lowers_the_loss_and_writes_the_run(method, tiny_model_dir, tiny_data_dir, tmp_path):
    from fflora.recipes.artifacts import load_trained

    out = tmp_path / "run"
    record = train(_cfg(tiny_model_dir, tiny_data_dir, out, method=method, max_steps=12, save_steps=100))
    losses = _logged_losses(out)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    run = json.loads((out / "run.json").read_text())
    assert run["global_step"] == 12 and run["parameters"]["trainable"] == run["parameters"]["ffba_params"]
    model = fflora.load_adapter(fflora.load_base_model(tiny_model_dir)[0], out / "adapter", strict=True)
    assert model.ffba_config.r == 4
    assert type(model.ffba_config) is {"ffba": fflora.FFBAConfig, "zflora": fflora.ZFLoRAConfig}[method]
    assert record["seconds_per_step"] > 0 and record["steps_run"] == 12
    assert load_trained(out, base_model=str(tiny_model_dir))[2] == method
    assert [point[0] for point in run["loss_curve"]] == list(range(1, 13))
    assert [point[1] for point in run["loss_curve"]] == losses


def test_every_steps_gradient_norm_is_kept_with_the_share_clipping_cut(tiny_model_dir, tiny_data_dir, tmp_path):
    """grad_norms.jsonl holds the norm before clipping of every step: at the logged steps, the very
    norm the Trainer logs; run.json counts the steps above max_grad_norm (1.0)."""
    out = tmp_path / "run"
    record = train(_cfg(tiny_model_dir, tiny_data_dir, out, max_steps=6, logging_steps=2, save_steps=100))
    norms = [json.loads(line) for line in (out / "grad_norms.jsonl").read_text().splitlines()]
    assert [n["step"] for n in norms] == [1, 2, 3, 4, 5, 6]
    logged = {r["step"]: r["grad_norm"] for r in map(json.loads, (out / "logs.jsonl").read_text().splitlines())
              if "grad_norm" in r}
    assert sorted(logged) == [2, 4, 6]
    for step, value in logged.items():
        assert norms[step - 1]["grad_norm"] == pytest.approx(value, rel=1e-6)
    values = sorted(n["grad_norm"] for n in norms)
    summary = record["grad_norm"]
    assert summary["steps"] == 6 and summary["max"] == values[-1] and summary["median"] == values[3]
    assert summary["clipped_share"] == sum(v > 1.0 for v in values) / 6 and summary["max_grad_norm"] == 1.0
    assert summary["first"] == norms[0]["grad_norm"] and summary["last"] == norms[-1]["grad_norm"]


def test_max_grad_norm_sets_the_clipping_and_zero_turns_it_off(tiny_model_dir, tiny_data_dir, tmp_path):
    """Clipped to 1e-6 on every step, AdamW's epsilon swamps the gradient: other weights than unclipped."""
    def run(name, max_grad_norm):
        record = train(_cfg(tiny_model_dir, tiny_data_dir, tmp_path / name, max_steps=3, save_steps=100,
                            max_grad_norm=max_grad_norm))
        return record["grad_norm"], load_file(tmp_path / name / "adapter" / WEIGHTS_NAME)

    (off, unclipped), (every, clipped) = run("off", 0.0), run("tiny", 1e-6)
    assert (off["max_grad_norm"], off["clipped_share"]) == (0.0, 0.0)
    assert (every["max_grad_norm"], every["clipped_share"]) == (1e-6, 1.0)
    assert any(not torch.equal(unclipped[k], clipped[k]) for k in unclipped)
    with pytest.raises(ValueError, match="--max-grad-norm must be >= 0"):
        _cfg(tiny_model_dir, tiny_data_dir, tmp_path / "bad", max_grad_norm=-1.0)


@pytest.mark.parametrize("method", ["ffba", "zflora"])
def test_resume_continues_exactly(method, tiny_model_dir, tiny_data_dir, tmp_path):
    """6 steps straight == 3 steps, a crash, --resume, 3 more steps (same adapter weights)."""
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, tiny_data_dir, out, method=method, dropout=0.1)
    train(cfg)
    straight = load_file(out / "adapter" / WEIGHTS_NAME)
    # Simulate a run killed right after its step-3 checkpoint.
    for leftover in ("checkpoint-6", "adapter", "run.json"):
        path = out / leftover
        subprocess.run(["rm", "-rf", str(path)], check=True)
    record = train(cfg, resume=True)
    assert record["resumed_from"].endswith("checkpoint-3") and record["global_step"] == 6
    resumed = load_file(out / "adapter" / WEIGHTS_NAME)
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-7, msg=key)


def test_existing_run_is_never_overwritten_and_resume_checks_settings(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, tiny_data_dir, out, max_steps=3))
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        train(_cfg(tiny_model_dir, tiny_data_dir, out, max_steps=3))
    with pytest.raises(ValueError, match=r"--resume with other settings.*lr: 0.01 -> 0.02"):
        train(_cfg(tiny_model_dir, tiny_data_dir, out, max_steps=3, lr=2e-2), resume=True)
    with pytest.raises(ValueError, match="nothing to resume"):
        train(_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "empty"), resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    model, tokenizer = fflora.load_base_model(tiny_model_dir)
    calls = {"n": 0}

    def poison(module, args, output):  # the 4th forward pass produces NaN logits
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 4 else output

    model.lm_head.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 4.*Last good checkpoint: .*checkpoint-3"):
        train(_cfg(tiny_model_dir, tiny_data_dir, out), model=model, tokenizer=tokenizer)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3"]
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-3" / WEIGHTS_NAME).values())
    assert not (out / ".staging").exists()


def test_a_loss_spike_stops_the_run_when_max_loss_ratio_is_set(tiny_model_dir, tiny_data_dir, tmp_path):
    """A run that blows up without reaching NaN is stopped as diverged, naming the spike and the fix."""
    model, tokenizer = fflora.load_base_model(tiny_model_dir)
    calls = {"n": 0}

    def blow_up(module, args, output):  # from the 4th forward pass on, logits 200x: a loss many times the first
        calls["n"] += 1
        return output * 200.0 if calls["n"] >= 4 else output

    model.lm_head.register_forward_hook(blow_up)
    out = tmp_path / "run"
    with pytest.raises(LossSpikeError, match=r"loss spike: \S+ at step 4, above 3 x the first logged loss .*"
                                             r"Last checkpoint: .*checkpoint-3\. Lower --lr, or raise --max-loss-ratio"):
        train(_cfg(tiny_model_dir, tiny_data_dir, out, max_loss_ratio=3.0), model=model, tokenizer=tokenizer)
    losses = _logged_losses(out)
    assert len(losses) == 4 and losses[3] > 3 * losses[0] and max(losses[1:3]) <= 3 * losses[0]
    with pytest.raises(ValueError, match="max_loss_ratio must be above 1"):
        _cfg(tiny_model_dir, tiny_data_dir, out, max_loss_ratio=0.5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_lora_and_full_fine_tuning_save_loadable_results(method, tiny_model_dir, tiny_data_dir, tmp_path):
    from fflora.recipes.artifacts import load_trained

    out = tmp_path / method
    record = train(_cfg(tiny_model_dir, tiny_data_dir, out, method=method, lora_r=2, max_steps=2, save_steps=1))
    expected = {"lora": fflora.lora_parameter_count(record_model_config(tiny_model_dir), 2),
                "full": record["parameters"]["total"]}[method]
    assert record["parameters"]["trainable"] == expected
    model, _, kind = load_trained(out, base_model=str(tiny_model_dir))
    assert kind == method


def record_model_config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def test_match_params_picks_the_closest_rank(tiny_model_dir):
    config = record_model_config(tiny_model_dir)
    target = fflora.lora_parameter_count(config, 4)
    r = match_adapter_rank(config, 4)
    gaps = {k: abs(fflora.ffba_parameter_count(config, fflora.FFBAConfig(r=k)) - target) for k in range(1, 40)}
    assert gaps[r] == min(gaps.values())


def test_smollm2_budget_match():
    """On SmolLM2-135M (config values written out), LoRA r=8 is matched by FFBA r=10."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64)
    assert fflora.lora_parameter_count(config, 8) == 2_442_240
    assert match_adapter_rank(config, 8) == 10
    assert fflora.ffba_parameter_count(config, fflora.FFBAConfig(r=10)) == 2_509_440
    # FA-only and BA-only adapters need ranks far above LoRA's: no search bound may cut them off.
    assert match_adapter_rank(config, 8, backward=False) == 35  # 2,419,200 (-0.9%); a bound of 4r + 1 gave 33 (-6.6%)
    assert match_adapter_rank(config, 8, forward=False) == 13
    assert match_adapter_rank(config, 64, backward=False) == 283


def test_two_process_data_parallel_run_on_gloo(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "ddp"
    # --standalone: the rendezvous on a free port of its own, never one a concurrent run holds
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(sys.executable).with_name("fflora")), "train", "--method", "ffba", "--task", "commonsense", "--model", str(tiny_model_dir),
           "--data-dir", str(tiny_data_dir), "--output-dir", str(out), "--rank", "2", "--max-steps", "3",
           "--batch-size", "2", "--max-length", "1024", "--save-steps", "2"]
    # the ranks measure --dtype auto: into a cache of the test's own, never the user's
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FFLORA_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["global_step"] == 3
    assert (out / "checkpoint-2" / WEIGHTS_NAME).is_file()
    assert (out / "adapter" / WEIGHTS_NAME).is_file()


def test_the_dev_split_is_fixed_held_out_and_scored(tiny_model_dir, tiny_data_dir, tmp_path):
    from fflora.recipes.evaluate import response_loss
    from fflora.recipes.train import dev_records, training_records

    dev = dev_records("commonsense", 16, tiny_data_dir)  # 2 of each of the 8 sets' 8 training records
    assert len(dev) == 16 and {r["dataset"] for r in dev} == set(fflora.recipes.data.COMMONSENSE)
    assert [r["id"] for r in dev] == [r["id"] for r in dev_records("commonsense", 16, tiny_data_dir)]
    for seed in (1, 2):
        cfg = _cfg(tiny_model_dir, tiny_data_dir, tmp_path / f"cfg{seed}", dev_size=16, seed=seed)
        trained_on = {r["id"] for r in training_records(cfg)}
        assert len(trained_on) == 64 - 16 and not trained_on & {r["id"] for r in dev}
    record = train(_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "run", dev_size=16, max_steps=3, save_steps=100))
    model, tokenizer = fflora.load_base_model(tiny_model_dir)
    fflora.load_adapter(model, tmp_path / "run" / "adapter")
    assert record["dev_loss"] == pytest.approx(response_loss(model, tokenizer, dev, 1024), rel=1e-5)


@torch.no_grad()
def test_response_loss_is_the_token_weighted_training_loss(tiny_model_dir, tiny_data_dir):
    from fflora.recipes.data import load_split
    from fflora.recipes.evaluate import response_loss
    from fflora.recipes.train import tokenize_example

    model, tokenizer = fflora.load_base_model(tiny_model_dir)
    records = load_split("piqa", "train", tiny_data_dir)[:3] + load_split("arc_e", "train", tiny_data_dir)[:2]
    total = tokens = 0
    for record in records:  # one at a time: no padding; transformers' own shifted loss
        example = tokenize_example(tokenizer, record, 1024)
        labels = torch.tensor([example["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        total += model(torch.tensor([example["input_ids"]]), labels=labels).loss.item() * n
        tokens += n
    assert response_loss(model, tokenizer, records, 1024, batch_size=4) == pytest.approx(total / tokens, rel=1e-5)


def test_resume_accepts_a_run_saved_before_a_setting_existed(tiny_model_dir, tiny_data_dir, tmp_path):
    """A run started by an older fflora lacks the settings added since: they had their defaults then."""
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, tiny_data_dir, out, max_steps=2, save_steps=1)
    train(cfg)
    saved = json.loads((out / "train_config.json").read_text())
    del saved["packing"], saved["dev_size"]
    (out / "train_config.json").write_text(json.dumps(saved))
    for leftover in ("checkpoint-2", "adapter", "run.json"):
        subprocess.run(["rm", "-rf", str(out / leftover)], check=True)
    assert train(cfg, resume=True)["resumed_from"].endswith("checkpoint-1")
    with pytest.raises(ValueError, match=r"other settings.*dev_size: 0 -> 4"):
        train(_cfg(tiny_model_dir, tiny_data_dir, out, max_steps=2, save_steps=1, dev_size=4), resume=True)


def test_examples_whose_prompt_fills_max_length_are_dropped_with_a_message_that_says_so(tiny_model_dir, capsys):
    from fflora.recipes.train import build_dataset

    tokenizer = fflora.load_base_model(tiny_model_dir)[1]
    short = {"question": "How much is 2 + 2?", "answer": 4}
    long = {"question": "How much is " + "2 + " * 300 + "2?", "answer": 602}
    dataset = build_dataset(tokenizer, [short, long, long], max_length=160)
    assert len(dataset) == 1
    assert ("dropped 2 of 3 examples: their prompt takes all 160 tokens, leaving no room for a response token "
            "(raise --max-length to keep them)") in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"every training example's prompt takes all of max_length=160 tokens, leaving "
                                         r"no room for its response; raise --max-length"):
        build_dataset(tokenizer, [long], max_length=160)
