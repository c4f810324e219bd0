"""A user's own data: formats detected and stated, a fixed held-out split, training and the held-out NLL."""

import json

import pytest

import fflora
from fflora.cli import main
from fflora.recipes.examples import prompt_and_response
from fflora.recipes.user_data import default_dev_size, held_out_user_records, load_user_records, split_user_records


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CHAT = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}."}]}
        for i in range(40)]
PAIRS = [{"prompt": f"Name the number after {i}.", "completion": f"It is {i + 1}."} for i in range(40)]


def test_each_format_is_detected_and_made_canonical(tmp_path, tiny_model_dir):
    tokenizer = fflora.load_base_model(tiny_model_dir)[1]
    records, kind = load_user_records(_write_jsonl(tmp_path / "chat.jsonl", CHAT))
    assert kind == "chat" and records[3]["id"] == "user-3" and records[3]["messages"][-1]["content"] == "4."
    with pytest.raises(ValueError, match="chat-format data needs a tokenizer with a chat template; this model has none"):
        prompt_and_response(tokenizer, records[3])
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    prompt, response = prompt_and_response(tokenizer, records[3])
    assert prompt == "<user>What is 3 + 1?\n<assistant>"
    assert response == "4." + tokenizer.eos_token

    records, kind = load_user_records(_write_jsonl(tmp_path / "pairs.jsonl", PAIRS))
    assert kind == "prompt/response" and records[0] | {} == {"id": "user-0", "dataset": "user",
                                                              "prompt": "Name the number after 0.", "response": "It is 1."}
    prompt, response = prompt_and_response(tokenizer, records[0])
    assert "Name the number after 0." in prompt and response == "It is 1." + tokenizer.eos_token

    alpaca = [{"instruction": "Add one.", "input": "41", "output": "42"}]
    assert load_user_records(_write_jsonl(tmp_path / "alpaca.jsonl", alpaca))[0][0]["prompt"] == "Add one.\n\n41"

    records, kind = load_user_records(_write_jsonl(tmp_path / "text.jsonl", [{"text": "Once upon a time."}]))
    assert kind == "text" and prompt_and_response(tokenizer, records[0]) == ("", "Once upon a time." + tokenizer.eos_token)
    # Characters a JSON string may hold unescaped that str.splitlines() takes for line ends: two records still
    raw = [{"text": "one\u2028line"}, {"text": "two\x85lines"}]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in raw), encoding="utf-8")
    assert [r["text"] for r in load_user_records(tmp_path / "raw.jsonl")[0]] == ["one\u2028line", "two\x85lines"]

    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(PAIRS[:5])}).save_to_disk(str(tmp_path / "saved"))
    records, kind = load_user_records(tmp_path / "saved")
    assert kind == "prompt/response" and len(records) == 5


def test_bad_data_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"keys \['question'\] is none of the formats --data takes: chat"):
        load_user_records(_write_jsonl(tmp_path / "a.jsonl", [{"question": "?"}]))
    with pytest.raises(ValueError, match=r"record 2 is text, the first record prompt/response: one format per file"):
        load_user_records(_write_jsonl(tmp_path / "b.jsonl", [PAIRS[0], {"text": "x"}]))
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"c.jsonl, line 2: not JSON .*one JSON object per line"):
        load_user_records(tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match="must be a list of {role, content} turns ending with an assistant turn"):
        load_user_records(_write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]))
    with pytest.raises(FileNotFoundError, match="--data .*nope.jsonl: no such file or folder"):
        load_user_records(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="holds out all 3 records"):
        split_user_records([{"id": i} for i in range(3)], 3)


def test_training_reads_its_data_before_the_model(tmp_path, monkeypatch):
    """Bad data fails in a second, before the seconds (or minutes) a model takes to load."""
    import fflora.recipes.train as train_module
    from fflora.recipes.settings import TrainConfig

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the data was read")

    monkeypatch.setattr(train_module, "load_base_model", no_load)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="--data .*empty.jsonl holds no records"):
        train_module.train(TrainConfig(task=None, method="ffba", data=str(tmp_path / "empty.jsonl"),
                                       output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_the_held_out_split_is_fixed_and_disjoint(tmp_path):
    path = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    records, _ = load_user_records(path)
    train, held = split_user_records(records, default_dev_size(len(records)))
    assert len(held) == 2 and len(train) == 38 and not {r["id"] for r in held} & {r["id"] for r in train}
    assert held == held_out_user_records(path)  # the same draw every time
    assert default_dev_size(10) == 1 and default_dev_size(100_000) == 200


def test_train_and_eval_on_own_data_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    assert main(["train", "--method", "ffba", "--data", str(data), "--model", str(tiny_model_dir), "--output-dir",
                 str(out), "--rank", "2", "--max-steps", "3", "--batch-size", "4", "--dtype", "float32",
                 "--dev-size", "4", "--save-steps", "10"]) == 0
    err = capsys.readouterr().err
    assert "pairs.jsonl: prompt/response pairs (trained on the response); 36 records to train on, 4 held out" in err
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["data"] == str(data) and run["config"]["task"] is None and run["dev_records"] == 4
    assert main(["eval", "--adapter", str(out), "--data", str(data), "--model", str(tiny_model_dir),
                 "--output", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["held_out"] == 4  # the run's own --dev-size, read from its run folder
    assert result["nll_per_token"] == pytest.approx(run["dev_loss"], rel=1e-5)
    assert "held-out NLL per response token" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--method", "ffba", "--task", "math", "--data", str(data), "--output-dir", str(out)])
    assert "argument --data: not allowed with argument --task" in capsys.readouterr().err


def test_compare_trains_each_method_in_one_dtype_at_a_matched_budget(tiny_model_dir, tmp_path, capsys):
    from fflora.recipes.budget import lora_parameter_count

    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "compare"
    args = ["compare", "--methods", "ffba", "lora", "--data", str(data), "--model", str(tiny_model_dir),
            "--output-dir", str(out), "--lora-rank", "2", "--max-steps", "2", "--batch-size", "4", "--dev-size", "4",
            "--save-steps", "10", "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    assert list(result["methods"]) == ["ffba", "lora"] and result["held_out_records"] == 4
    dtypes = {json.loads((out / m / "run.json").read_text())["dtype"]["dtype"] for m in ("ffba", "lora")}
    assert dtypes == {result["dtype"]}  # one dtype for both (the first run's, given to the second)
    ffba, lora = result["methods"]["ffba"], result["methods"]["lora"]
    config = fflora.load_base_model(tiny_model_dir)[0].config
    assert lora["rank"] == 2 and lora["trainable"] == lora_parameter_count(config, 2)
    assert abs(ffba["trainable"] - lora["trainable"]) <= abs(
        fflora.ffba_parameter_count(config, fflora.FFBAConfig(r=ffba["rank"] + 1)) - lora["trainable"])
    for method in ("ffba", "lora"):  # each method's held-out NLL is its run's dev loss
        assert result["methods"][method]["held_out_nll"] == json.loads((out / method / "run.json").read_text())["dev_loss"]
    assert result["base"]["held_out_nll"] > 0
    assert set(result["latency"]) == {"base", "ffba_fused", "lora_unmerged", "lora_merged"}
    assert result["latency"]["base"]["tpot_over_base"] == 1.0
    assert "| base model (no training) | | 0 |" in printed and "| ffba_fused |" in printed
    assert (out / "compare.md").read_text().strip() in printed
    assert main(args) == 0  # finished runs are reused, not trained again
    assert "compare: training" not in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--methods takes two or more of \['ffba', 'zflora', 'lora'\], each once"):
        from fflora.recipes.settings import CompareSettings
        CompareSettings(methods=("ffba",))
