import json

import pytest
import torch

from conftest import randomize_adapters

import fflora
from fflora.recipes.data import load_split
from fflora.recipes.evaluate import _best_full_candidate, choice_text_scores, evaluate, format_table, loglik_choices
from fflora.recipes.prompts import choice_text_pairs, commonsense_response, instruction_and_response, render_prompt


def _tiny(tiny_model_dir, adapter=True):
    model, tokenizer = fflora.load_base_model(tiny_model_dir)
    if adapter:
        fflora.apply_ffba(model, fflora.FFBAConfig(r=4))
        randomize_adapters(model, std=0.2)
    return model, tokenizer


def test_batched_shared_stem_scoring_equals_full_scoring(tiny_model_dir, tiny_data_dir):
    model, tokenizer = _tiny(tiny_model_dir)
    records = [r for d in ("arc_e", "piqa", "boolq", "winogrande") for r in load_split(d, "test", tiny_data_dir)]
    fast = loglik_choices(model, tokenizer, records)
    full = []
    for record in records:
        prompt = tokenizer(render_prompt(tokenizer, instruction_and_response(record)[0]), add_special_tokens=False)["input_ids"]
        candidates = [tokenizer(commonsense_response(record, k), add_special_tokens=False)["input_ids"]
                      for k in range(len(record["choices"]))]
        full.append(_best_full_candidate(model, prompt, candidates))
    assert fast == full
    assert len(set(fast)) > 1  # the random adapter makes the scores differ, so this compares something


def test_evaluation_in_every_mode_writes_results(tiny_model_dir, tiny_data_dir, tmp_path):
    model, tokenizer = _tiny(tiny_model_dir)
    out = tmp_path / "eval.json"
    summary = evaluate(model, tokenizer, ["commonsense"], data_dir=tiny_data_dir, limit=3, mode="loglik", output=out)
    assert set(summary["datasets"]) == {"boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"}
    assert all(r["n"] == 3 and 0 <= r["accuracy"] <= 100 for r in summary["datasets"].values())
    assert json.loads(out.read_text()) == summary
    rows = [json.loads(line) for line in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {"dataset", "id", "prediction", "correct"} <= set(rows[0])
    table = format_table(summary)
    assert "| **average** |" in table and "| boolq | 3 |" in table
    boolq = summary["datasets"]["boolq"]  # labels 0, 1, 0 on the first three items
    assert boolq["best_constant"]["label"] == 0 and abs(boolq["best_constant"]["accuracy"] - 200 / 3) < 1e-9
    assert sum(boolq["predicted_labels"].values()) == 3
    assert "66.7 (always 0)" in table
    assert abs(summary["best_constant_average"] - (3 * 200 / 3 + 5 * 100 / 3) / 8) < 1e-9  # 3 two-way, 5 four-way sets
    math = evaluate(model, tokenizer, ["addsub"], data_dir=tiny_data_dir, max_new_tokens=4)
    assert math["datasets"]["addsub"]["n"] == 4
    summ = evaluate(model, tokenizer, ["summary"], data_dir=tiny_data_dir, max_new_tokens=4)
    assert summ["metric"] == "rougeL" and set(summ["datasets"]["xsum"]) == {"n", "rouge1", "rouge2", "rougeL"}


def test_fused_and_unfused_models_give_the_same_predictions(tiny_model_dir, tiny_data_dir):
    model, tokenizer = _tiny(tiny_model_dir)
    kwargs = dict(data_dir=tiny_data_dir, limit=3, max_new_tokens=6)
    unfused = evaluate(model, tokenizer, ["arc_e", "gsm8k"], **kwargs)
    fflora.fuse(model)
    assert evaluate(model, tokenizer, ["arc_e", "gsm8k"], **kwargs) == unfused


def _tiny_of_kind(tiny_model_dir, kind: str):
    """A tiny model: the base, with a random FFBA adapter in training form, or a random PEFT LoRA model."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = _tiny(tiny_model_dir, adapter=False)
    with torch.no_grad():  # base weights whose answers differ in length and text
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.2)
    if kind == "ffba":
        fflora.apply_ffba(model, fflora.FFBAConfig(r=4))
        randomize_adapters(model, std=0.2)
    if kind == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        randomize_adapters(model, std=0.2)
    return model.eval(), tokenizer


@pytest.mark.parametrize("kind", ["base", "ffba", "lora"])
def test_the_slot_engine_gives_transformers_greedy_answers(tiny_model_dir, tiny_data_dir, tmp_path, kind):
    # 4 AddSub and 4 GSM8K prompts of different lengths in 3 slots: rows end apart and new prompts join
    kwargs = dict(data_dir=tiny_data_dir, batch_size=3, max_new_tokens=24)
    outputs = {}
    for engine in ("transformers", "slots"):  # a fresh model each: the slot engine fuses (merges) it in place
        model, tokenizer = _tiny_of_kind(tiny_model_dir, kind)
        out = tmp_path / f"{engine}.json"
        summary = evaluate(model, tokenizer, ["addsub", "gsm8k"], engine=engine, output=out, **kwargs)
        assert summary["engine"] == engine
        outputs[engine] = [json.loads(line)["output"] for line in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    assert outputs["slots"] == outputs["transformers"]
    assert len(outputs["slots"]) == 8 and len({len(text) for text in outputs["slots"]}) > 1


def test_an_unknown_engine_is_refused_with_the_choices(tiny_model_dir, tiny_data_dir):
    model, tokenizer = _tiny(tiny_model_dir, adapter=False)
    with pytest.raises(ValueError, match=r"engine 'vllm': choose one of \['transformers', 'slots'\]"):
        evaluate(model, tokenizer, ["addsub"], data_dir=tiny_data_dir, engine="vllm")


def test_choice_text_pairs_follow_lm_eval_harness_formats():
    wino = {"dataset": "winogrande", "question": "Ann gave Bob a gift because _ was kind.", "choices": ["Ann", "Bob"]}
    assert choice_text_pairs(wino) == [("Ann gave Bob a gift because Ann", " was kind."),
                                       ("Ann gave Bob a gift because Bob", " was kind.")]
    boolq = {"dataset": "boolq", "question": "is water wet", "choices": ["true", "false"], "context": "Water is wet."}
    context = "Water is wet.\nQuestion: is water wet?\nAnswer:"
    assert choice_text_pairs(boolq) == [(context, " yes"), (context, " no")]
    arc = {"dataset": "arc_e", "question": "Which is a metal?", "choices": ["iron", "wood"]}
    assert choice_text_pairs(arc) == [("Question: Which is a metal?\nAnswer:", " iron"),
                                      ("Question: Which is a metal?\nAnswer:", " wood")]
    swag = {"dataset": "hellaswag", "question": "He opens the door and", "choices": ["walks in.", "sings."]}
    assert choice_text_pairs(swag) == [("He opens the door and", " walks in."), ("He opens the door and", " sings.")]


@torch.no_grad()
def test_choice_text_scores_equal_scoring_each_choice_alone(tiny_model_dir, tiny_data_dir):
    model, tokenizer = _tiny(tiny_model_dir)
    records = [r for d in ("arc_e", "piqa", "boolq", "winogrande", "hellaswag") for r in load_split(d, "test", tiny_data_dir)]
    scores = choice_text_scores(model, tokenizer, records)
    for record, score in zip(records, scores):
        logliks, per_byte = [], []
        for context, continuation in choice_text_pairs(record):
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            logprobs = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1], -1)
            logliks.append(logprobs[torch.arange(len(cont)), torch.tensor(cont)].sum().item())
            per_byte.append(logliks[-1] / len(continuation.encode()))
        assert score["logliks"] == pytest.approx(logliks, abs=1e-4)
        assert score["acc"] == max(range(len(logliks)), key=logliks.__getitem__)
        assert score["acc_norm"] == max(range(len(per_byte)), key=per_byte.__getitem__)
        gold = tokenizer(choice_text_pairs(record)[record["label"]][1], add_special_tokens=False)["input_ids"]
        assert score["nll"] == pytest.approx(-logliks[record["label"]] / len(gold), abs=1e-5)
    assert any(s["acc"] != s["acc_norm"] for s in scores)  # choices of different lengths: the normalisation matters
    summary = evaluate(model, tokenizer, ["commonsense"], data_dir=tiny_data_dir, limit=3, mode="text")
    assert abs(summary["chance_average"] - (3 * 50 + 5 * 25) / 8) < 1e-9
    assert all(set(r) == {"n", "accuracy", "accuracy_norm", "chance", "nll"} for r in summary["datasets"].values())
    assert summary["nll_average"] == pytest.approx(sum(r["nll"] for r in summary["datasets"].values()) / 8)
    assert "| dataset | n | acc (%) | acc_norm (%) | chance (%) | gold answer NLL / token |" in format_table(summary)


def test_cloze_scores_and_nll_by_hand_on_a_model_that_predicts_uniformly(tiny_model_dir):
    """With the final norm's weight zero every logit is 0: each token has log-probability -log(V), so a
    choice's log-likelihood is -(its tokens) log V, known without running anything."""
    import math

    model, tokenizer = _tiny(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    vocab = model.config.vocab_size
    record = {"id": "arc_e-test-0", "dataset": "arc_e", "question": "Which is hot?",
              "choices": ["a fire", "ice", "lava"], "label": 2}  # character tokens: 7, 4 and 5 with the space
    score = choice_text_scores(model, tokenizer, [record])[0]
    assert score["logliks"] == pytest.approx([-7 * math.log(vocab), -4 * math.log(vocab), -5 * math.log(vocab)],
                                             rel=1e-6)
    assert score["acc"] == 1  # fewest tokens
    assert score["acc_norm"] == 0  # one token a byte here: every choice scores -log V per byte, the first wins
    assert score["nll"] == pytest.approx(math.log(vocab), rel=1e-6)


def test_loglik_mode_refuses_generation_tasks(tiny_model_dir, tiny_data_dir):

    model, tokenizer = _tiny(tiny_model_dir, adapter=False)
    with pytest.raises(ValueError, match=r"mode 'loglik' scores the choices of multiple-choice sets \(commonsense\) only, "
                                         r"not \['gsm8k'\]"):
        evaluate(model, tokenizer, ["gsm8k"], data_dir=tiny_data_dir, mode="loglik")
    with pytest.raises(ValueError, match="engine 'slots': an engine decodes the answers of mode 'generate', not mode 'nll'"):
        evaluate(model, tokenizer, ["gsm8k"], data_dir=tiny_data_dir, mode="nll", engine="slots")


def test_cli_train_then_eval(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    from fflora.cli import main

    out = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir)]
    assert main(["train", "--method", "ffba", "--task", "commonsense", "--output-dir", str(out), "--rank", "2",
                 "--max-steps", "2", "--batch-size", "2", "--max-length", "1024", *common]) == 0
    assert "ffba: " in capsys.readouterr().out
    assert main(["eval", "--adapter", str(out), "--task", "piqa", "--limit", "2", "--mode", "loglik", *common]) == 0
    assert "| piqa | 2 |" in capsys.readouterr().out
    result = tmp_path / "addsub.json"
    assert main(["eval", "--adapter", str(out), "--task", "addsub", "--limit", "3", "--engine", "slots",
                 "--max-new-tokens", "4", "--output", str(result), *common]) == 0
    assert "| addsub | 3 |" in capsys.readouterr().out and json.loads(result.read_text())["engine"] == "slots"
    assert main(["eval", "--task", "nope", *common]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "--task", "piqa", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "none")]) == 2
    assert "fflora data prepare --tasks piqa" in capsys.readouterr().err


def test_nll_mode_scores_the_reference_response_in_each_form(tiny_model_dir, tiny_data_dir, tmp_path):
    """Mode nll: each item's reference response NLL per token, as scoring the training example by hand."""
    from fflora.recipes.examples import tokenize_example

    model, tokenizer = _tiny(tiny_model_dir)
    for dataset, form in (("gsm8k", "instruction"), ("arc_e", "cloze"), ("arc_e", "instruction")):
        summary = evaluate(model, tokenizer, [dataset], data_dir=tiny_data_dir, limit=3, mode="nll", form=form,
                           output=tmp_path / f"{dataset}-{form}.json")
        rows = [json.loads(line) for line in (tmp_path / f"{dataset}-{form}.predictions.jsonl").read_text().splitlines()]
        for record, row in zip(load_split(dataset, "test", tiny_data_dir), rows):
            example = tokenize_example(tokenizer, record, 1024, form)
            logprobs = torch.log_softmax(model(torch.tensor([example["input_ids"]])).logits[0], -1)
            labelled = [i for i, label in enumerate(example["labels"]) if label != -100]
            expected = -sum(logprobs[i - 1, example["input_ids"][i]].item() for i in labelled) / len(labelled)
            assert row["nll"] == pytest.approx(expected, rel=1e-5) and row["tokens"] == len(labelled)
        assert summary["metric"] == "nll" and summary["average"] == pytest.approx(sum(r["nll"] for r in rows) / 3)
        assert "reference NLL / token" in format_table(summary)
    with pytest.raises(ValueError, match="form 'cloze'"):
        evaluate(model, tokenizer, ["gsm8k"], data_dir=tiny_data_dir, mode="nll", form="cloze")
