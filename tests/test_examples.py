"""Packed batches, the labelled-positions loss, and the data forms (fflora.recipes.examples)."""

import json

import pytest
from peft import LoraConfig, get_peft_model
import torch
from conftest import make_model, randomize_adapters
from transformers import DataCollatorForSeq2Seq

import fflora
from fflora.recipes.examples import (PACKED_ATTENTION, check_form, example_nll, pack, packed_attention_while,
                                     prompt_and_response, token_nll, tokenize_example)
from fflora.recipes.dtype import choose_dtype, step_seconds
from fflora.recipes.settings import TrainConfig


def _examples(lengths, vocab=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        prompt = n // 2
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _padded(examples):
    width = max(len(e["input_ids"]) for e in examples)
    return {"input_ids": torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in examples]),
            "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"]))
                                            for e in examples]),
            "labels": torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples])}


@pytest.mark.parametrize("method", ["ffba", "zflora", "none"])
def test_packed_loss_and_gradients_equal_the_padded_reference(arch, method):
    """One packed row (per-example attention) gives transformers' own padded loss and the same
    gradients; Gemma 3's sliding window (8 here) is shorter than the examples, so its band is used."""
    if method == "zflora" and arch == "gemma3_text":
        pytest.skip("zFLoRA refuses Gemma 3")
    model = make_model(arch)
    if method != "none":
        fflora.apply_adapter(model, fflora.FFBAConfig(r=4, alpha=8) if method == "ffba" else fflora.ZFLoRAConfig(r=4))
        randomize_adapters(model)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    examples = _examples([13, 5, 21, 9])
    params = [p for p in model.parameters() if p.requires_grad]

    reference = model(**_padded(examples)).loss
    ref_grads = torch.autograd.grad(reference, params)
    with packed_attention_while(model, True):
        assert model.config._attn_implementation == PACKED_ATTENTION
        packed = token_nll(model, pack(examples)).mean()
        grads = torch.autograd.grad(packed, params)
    assert model.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    # the labelled-positions loss on the padded batch is the same figure
    torch.testing.assert_close(token_nll(model, _padded(examples)).mean(), reference, rtol=1e-5, atol=1e-6)


def test_example_nll_is_each_examples_own_sum(arch, monkeypatch):
    """Packed several to a pass with per-example attention (Gemma 3's window of 8 shorter than some
    examples), each example's (summed NLL, tokens) equals scoring it alone by hand."""
    import fflora.recipes.examples as examples_module

    model = make_model(arch)
    examples = _examples([7, 12, 4, 9, 15])
    attentions = []
    scored = examples_module.token_nll
    monkeypatch.setattr(examples_module, "token_nll",
                        lambda m, batch: attentions.append(m.config._attn_implementation) or scored(m, batch))
    scores = example_nll(model, examples, batch_size=3)
    assert attentions == [PACKED_ATTENTION] * 2 and model.config._attn_implementation == "sdpa"  # then restored
    for example, (total, count) in zip(examples, scores):
        ids = torch.tensor([example["input_ids"]])
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
        labelled = [i for i, label in enumerate(example["labels"]) if label != -100]
        expected = -sum(logprobs[i - 1, example["input_ids"][i]].item() for i in labelled)
        assert count == len(labelled)
        assert total == pytest.approx(expected, rel=1e-5)


def test_training_packed_and_padded_log_the_same_losses(tiny_model_dir, tiny_data_dir, tmp_path):
    from fflora.recipes.train import train

    def losses(packing):
        out = tmp_path / f"run-{packing}"
        train(TrainConfig(method="ffba", task="commonsense", output_dir=str(out), model=str(tiny_model_dir),
                          data_dir=str(tiny_data_dir), r=4, alpha=8, max_steps=4, batch_size=4, lr=1e-2,
                          max_length=1024, save_steps=100, logging_steps=1, warmup_ratio=0.0, dtype="float32",
                          packing=packing))
        rows = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
        run = json.loads((out / "run.json").read_text())
        return [r["loss"] for r in rows if "loss" in r], run

    packed, run = losses(True)
    padded, _ = losses(False)
    assert packed == pytest.approx(padded, rel=1e-4)
    assert run["tokens"] > 0 and run["tokens_per_s"] > 0 and run["dtype"]["dtype"] == "float32"


def test_auto_dtype_is_measured_once_per_machine_and_model_and_a_resumed_run_keeps_it(tmp_path, monkeypatch):
    import fflora.recipes.dtype as dtype_module

    cache = tmp_path / "cache" / "machine-dtype.json"
    monkeypatch.setattr(dtype_module, "machine_dtype_file", lambda: cache)
    model, other_model = make_model("llama"), make_model("llama")
    other_model.config._name_or_path = "org/other"
    cfg = TrainConfig(method="ffba", task="commonsense", output_dir=str(tmp_path))
    calls = []

    def timed(times):
        def step_seconds(model, batch, dtype):
            calls.append(dtype)
            return times[dtype]
        return step_seconds

    monkeypatch.setattr(dtype_module, "step_seconds", timed({"float32": 3.0, "bfloat16": 1.0}))
    choice = choose_dtype(cfg.dtype, model, {}, tmp_path, resume=False)
    assert choice["dtype"] == "bfloat16" and choice["seconds_per_step"] == {"float32": 3.0, "bfloat16": 1.0}
    assert calls == ["float32", "bfloat16"] * 2  # interleaved, two rounds
    assert choice["why"].startswith("measured: the faster training step on this CPU (kept for every later run")
    key = dtype_module.machine_key(model)
    assert json.loads(cache.read_text())[key]["dtype"] == "bfloat16" and "3 x 32, vocabulary 128" in key
    lora_model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules="all-linear"))
    assert dtype_module.machine_key(lora_model) == key  # an adapter on the base does not change the key
    # A new run on this machine and model (another method, a busier CPU) takes the kept dtype, unmeasured.
    monkeypatch.setattr(dtype_module, "step_seconds", timed({"float32": 1.0, "bfloat16": 2.0}))
    lora = TrainConfig(method="lora", task="commonsense", output_dir=str(tmp_path / "lora"))
    again = choose_dtype(lora.dtype, model, {}, tmp_path / "lora", resume=False)
    assert again["dtype"] == "bfloat16" and len(calls) == 4 and "measured once on this machine" in again["why"]
    assert choose_dtype(cfg.dtype, model, {}, tmp_path, resume=True)["dtype"] == "bfloat16"  # kept from the start
    # Another model (its size is in the key) or another machine measures for itself.
    assert choose_dtype(cfg.dtype, other_model, {}, tmp_path, resume=False)["dtype"] == "float32" and len(calls) == 8
    monkeypatch.setattr(dtype_module, "machine_key", lambda model: "another CPU")
    assert choose_dtype(cfg.dtype, model, {}, tmp_path, resume=False)["dtype"] == "float32"
    assert len(json.loads(cache.read_text())) == 3
    fixed = TrainConfig(method="ffba", task="commonsense", output_dir=str(tmp_path), dtype="bfloat16")
    assert choose_dtype(fixed.dtype, model, {}, tmp_path, resume=False) == {"dtype": "bfloat16", "why": "set by the run"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert choose_dtype(cfg.dtype, model, {}, tmp_path, resume=False)["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"unknown dtype 'fp16'; choose one of \['auto', 'float32', 'bfloat16'\]"):
        TrainConfig(method="ffba", task="commonsense", output_dir="x", dtype="fp16")


def test_measuring_a_step_leaves_the_model_and_the_rng_as_they_were():
    model = make_model("llama")
    fflora.apply_adapter(model, fflora.FFBAConfig(r=4, alpha=8, dropout=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    for dtype in ("float32", "bfloat16"):
        assert step_seconds(model, pack(_examples([6, 9])), dtype, steps=1) > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cloze_form_is_the_question_then_the_gold_answers_text(tiny_model_dir):
    tokenizer = fflora.load_base_model(tiny_model_dir)[1]
    record = {"id": "arc_e-test-0", "dataset": "arc_e", "question": "Which is hot?", "choices": ["ice", "fire"],
              "label": 1}
    assert prompt_and_response(tokenizer, record, "cloze") == ("Question: Which is hot?\nAnswer:", " fire")
    example = tokenize_example(tokenizer, record, 1024, "cloze")
    prompt = tokenizer("Question: Which is hot?\nAnswer:", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" fire", add_special_tokens=False)["input_ids"]
    assert example == {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}
    boolq = {"id": "b", "dataset": "boolq", "question": "is it", "choices": ["true", "false"], "label": 1,
             "context": "Text."}
    assert prompt_and_response(tokenizer, boolq, "cloze")[1] == " no"
    assert tokenize_example(tokenizer, record, len(prompt), "cloze") is None  # no answer token fits
    with pytest.raises(ValueError, match="form 'cloze' .* gsm8k is not one: use form 'instruction'"):
        check_form("cloze", [{"dataset": "gsm8k", "question": "1 + 1?", "answer": 2.0}])
    with pytest.raises(ValueError, match="unknown data form 'label'"):
        check_form("label", [])
    with pytest.raises(ValueError, match="form 'cloze' trains multiple-choice answers"):
        TrainConfig(method="ffba", task="math", output_dir="x", form="cloze")


def test_padded_collator_still_trains_on_the_same_examples(tiny_model_dir):
    """packing=False uses transformers' padding collator: same tokens, right padding, a mask."""
    from fflora.recipes.train import collator

    tokenizer = fflora.load_base_model(tiny_model_dir)[1]
    tokenizer.padding_side = "right"
    examples = _examples([3, 6], vocab=40)
    batch = collator(tokenizer, packing=False)(examples)
    assert isinstance(collator(tokenizer, packing=False), DataCollatorForSeq2Seq)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert pack(examples)["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5]]
