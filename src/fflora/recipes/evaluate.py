"""Evaluation: generation with answer extraction, log-likelihood multiple choice, ROUGE.

* commonsense, generate: greedy decoding, first candidate label named in the output (LLM-Adapters).
* commonsense, loglik:   the candidate response ("the correct answer is answerK") with the highest
                         log-likelihood; no generation, one forward pass per example when the
                         candidates differ only in their last token (they do for these prompts).
* commonsense, text:     the choice whose own text is the most likely after the question
                         (lm-eval-harness style, acc and byte-length-normalised acc_norm): no
                         label words, so no label bias; and the gold answer's NLL per token.
* math:    greedy decoding, last number in the output, correct within 1e-3.
* summary: greedy decoding, ROUGE-1/2/L F1.
FFBA adapters are evaluated in their fused form. Greedy decoding runs on one of two engines
(`ENGINES`): transformers' `generate`, `batch_size` prompts a batch, or fflora's slot engine
(`serving.offline`: continuous batching over `batch_size` slots; the same answers, 1.5-2.1x as fast
on math, for a model turned into its inference form in place: fused, a LoRA merged).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..serving.offline import generate_all, inference_form
from .data import family_of, load_split
from .examples import check_form, continuation_example, example_nll, tokenize_example
from .metrics import accuracy, best_constant_label, extract_choice, extract_number, label_histogram, math_correct, rouge
from .prompts import choice_text_pairs, commonsense_response, instruction_and_response, render_prompt
from .settings import ENGINES, check_engine, check_evaluation

MAX_NEW_TOKENS = {"commonsense": 32, "math": 256, "summary": 64}


def _batches(items: list, size: int, desc: str):
    for start in tqdm(range(0, len(items), size), desc=desc, unit="batch", leave=False):
        yield items[start : start + size]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of a batch of prompts (left padding)."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def text_generator(model, tokenizer, engine: str = "transformers", batch_size: int = 8):
    """`generate(prompts, max_new_tokens) -> completions`: greedy, on `engine` (see the module docstring)."""
    check_engine(engine)
    if engine == "transformers":
        return lambda prompts, new_tokens: [text for chunk in _batches(prompts, batch_size, "generate")
                                            for text in generate(model, tokenizer, chunk, new_tokens)]
    fused = inference_form(model)

    def on_slots(prompts: list[str], new_tokens: int) -> list[str]:
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return tokenizer.batch_decode(generate_all(fused, ids, new_tokens, slots=batch_size), skip_special_tokens=True)
    return on_slots


@torch.no_grad()
def loglik_choices(model, tokenizer, records: list[dict]) -> list[int]:
    """For each commonsense record, the index of the most likely candidate response.

    When a record's candidates share all but their last token (true for the LLM-Adapters prompts:
    "... answer1" / "... answer2"), their scores differ only in that token's log-probability, so one
    batched forward pass over prompt + shared stem scores them all. Otherwise each candidate's
    response tokens are scored in full.
    """
    predictions: dict[int, int] = {}
    shared = []
    for i, record in enumerate(records):
        prompt = tokenizer(render_prompt(tokenizer, instruction_and_response(record)[0]), add_special_tokens=False)["input_ids"]
        candidates = [tokenizer(commonsense_response(record, k), add_special_tokens=False)["input_ids"]
                      for k in range(len(record["choices"]))]
        stem = candidates[0][:-1]
        if all(len(c) == len(candidates[0]) and c[:-1] == stem for c in candidates):
            shared.append((i, prompt + stem, [c[-1] for c in candidates]))
        else:
            predictions[i] = _best_full_candidate(model, prompt, candidates)
    if shared:
        logprobs = _last_token_logprobs(model, tokenizer.pad_token_id, [ids for _, ids, _ in shared])
        for row, (i, _, last_tokens) in enumerate(shared):
            predictions[i] = int(torch.argmax(logprobs[row, last_tokens]))
    return [predictions[i] for i in range(len(records))]


@torch.no_grad()
def choice_text_scores(model, tokenizer, records: list[dict]) -> list[dict]:
    """For each commonsense record, the choice picked by the log-likelihood of its own text.

    `logliks`: each choice's summed continuation log-probability; `acc`: the highest of them; `acc_norm`: the
    highest per byte of continuation text (lm-eval-harness's length normalisation); `nll`: the gold
    choice's NLL per token (the continuous metric: it moves long before an accuracy does). Every
    (context, continuation) pair of the records is scored in one packed pass.
    """
    pairs, owners = [], []
    for i, record in enumerate(records):
        for context, continuation in choice_text_pairs(record):
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            pairs.append((continuation_example(ctx, cont, len(ctx) + len(cont)), len(continuation.encode())))
            owners.append(i)
    scores = example_nll(model, [example for example, _ in pairs], batch_size=len(pairs))
    out = []
    for i, record in enumerate(records):
        rows = [k for k, owner in enumerate(owners) if owner == i]
        logliks = [-scores[k][0] for k in rows]
        acc = max(range(len(rows)), key=lambda j: logliks[j])
        acc_norm = max(range(len(rows)), key=lambda j: logliks[j] / pairs[rows[j]][1])
        gold_nll, gold_tokens = scores[rows[record["label"]]]
        out.append({"acc": acc, "acc_norm": acc_norm, "logliks": logliks, "nll": gold_nll / gold_tokens})
    return out


def response_loss(model, tokenizer, records: list[dict], max_length: int = 256, batch_size: int = 8,
                  form: str = "instruction") -> float:
    """Mean negative log-likelihood per response token of `records` in a data form (prompt masked,
    as in training).

    The held-out loss of the accuracy study: continuous, so far less noisy than accuracy on a few
    hundred items. Records whose response does not fit in `max_length` are skipped, as in training.
    """
    check_form(form, records)
    examples = [e for e in (tokenize_example(tokenizer, r, max_length, form) for r in records) if e is not None]
    if not examples:
        raise ValueError(f"no record keeps a response token within max_length={max_length}")
    scores = example_nll(model, examples, batch_size, progress=lambda it: tqdm(it, desc="dev loss", leave=False))
    return sum(total for total, _ in scores) / sum(count for _, count in scores)


def _last_token_logprobs(model, pad_id: int, sequences: list[list[int]]) -> torch.Tensor:
    """Next-token log-probabilities after each sequence, in one left-padded batch."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences], device=model.device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
    return F.log_softmax(logits.float(), dim=-1)


def _best_full_candidate(model, prompt: list[int], candidates: list[list[int]]) -> int:
    scores = []
    for c in candidates:
        ids = torch.tensor([prompt + c], device=model.device)
        logprobs = F.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
        scores.append(logprobs.gather(-1, torch.tensor(c, device=model.device)[:, None]).sum())
    return int(torch.argmax(torch.stack(scores)))


def gold_nll(model, tokenizer, records: list[dict], form: str = "instruction", max_length: int = 1024,
             batch_size: int = 8) -> list[dict]:
    """Per record: the NLL per token of its reference response in a form (the gold rationale of a
    math item, the gold answer's text in the cloze form, ...), with its token count; None for a
    record whose response does not fit in max_length."""
    check_form(form, records)
    examples = [tokenize_example(tokenizer, r, max_length, form) for r in records]
    kept = [e for e in examples if e is not None]
    scores = iter(example_nll(model, kept, batch_size, progress=lambda it: tqdm(it, desc="gold NLL", leave=False)))
    out = []
    for record, example in zip(records, examples):
        total, count = next(scores) if example is not None else (None, 0)
        out.append({"id": record["id"], "nll": None if total is None else total / count, "tokens": count})
    return out


def evaluate_dataset(model, tokenizer, dataset: str, *, data_dir=None, limit=None, mode="generate",
                     batch_size=8, max_new_tokens=None, form="instruction", max_length=1024,
                     generator=None) -> tuple[dict, list[dict]]:
    """(metrics, per-example predictions) of the model on the test split of one dataset, which
    `check_evaluation` allows for `mode` (`evaluate` checks).

    `form` and `max_length` apply to mode "nll" (the reference response's NLL in that data form);
    `generator` to mode "generate" (a `text_generator`; default: transformers' `generate`)."""
    family = family_of(dataset)
    records = load_split(dataset, "test", data_dir)[:limit]
    rows = []
    if mode == "nll":
        rows = gold_nll(model, tokenizer, records, form, max_length, batch_size)
        scored = [r for r in rows if r["nll"] is not None]
        if not scored:
            raise ValueError(f"no {dataset} response fits in max_length={max_length}; raise it")
        return {"n": len(scored), "skipped_too_long": len(rows) - len(scored),
                "nll": sum(r["nll"] for r in scored) / len(scored),  # per token, mean over items
                "nll_per_token": sum(r["nll"] * r["tokens"] for r in scored) / sum(r["tokens"] for r in scored)}, rows
    if mode == "text":
        for chunk in _batches(records, batch_size, dataset):
            for record, pred in zip(chunk, choice_text_scores(model, tokenizer, chunk)):
                rows.append({"id": record["id"], "prediction": pred["acc"], "correct": pred["acc"] == record["label"],
                             "prediction_norm": pred["acc_norm"], "correct_norm": pred["acc_norm"] == record["label"],
                             "nll": pred["nll"]})
        metrics = {"accuracy": 100.0 * accuracy([r["correct"] for r in rows]),
                   "accuracy_norm": 100.0 * accuracy([r["correct_norm"] for r in rows]),
                   "nll": sum(r["nll"] for r in rows) / len(rows),  # the gold answer's, per token, mean over items
                   "chance": 100.0 * sum(1 / len(r["choices"]) for r in records) / len(records)}
        return {"n": len(rows), **metrics}, rows
    if mode == "loglik":
        for chunk in _batches(records, batch_size, dataset):
            for record, pred in zip(chunk, loglik_choices(model, tokenizer, chunk)):
                rows.append({"id": record["id"], "prediction": pred, "correct": pred == record["label"]})
    else:
        generator = generator or text_generator(model, tokenizer, "transformers", batch_size)
        prompts = [render_prompt(tokenizer, instruction_and_response(r)[0]) for r in records]
        for record, text in zip(records, generator(prompts, max_new_tokens or MAX_NEW_TOKENS[family])):
            rows.append({"id": record["id"], "output": text, **_score(family, record, text)})
    if family == "summary":
        metrics = rouge([r["output"] for r in rows], [r["summary"] for r in records])
    else:
        metrics = {"accuracy": 100.0 * accuracy([r["correct"] for r in rows])}
    if family == "commonsense":  # a label-format accuracy means little without its trivial baseline
        metrics["best_constant"] = best_constant_label([r["label"] for r in records])
        metrics["predicted_labels"] = label_histogram([r["prediction"] for r in rows])
    elif family == "math":  # always giving the most common answer of these items
        metrics["best_constant"] = best_constant_label([r["answer"] for r in records])
    return {"n": len(rows), **metrics}, rows


def _score(family: str, record: dict, text: str) -> dict:
    if family == "commonsense":
        pred = extract_choice(record, text)
        return {"prediction": pred, "correct": pred == record["label"]}
    if family == "math":
        pred = extract_number(text)
        return {"prediction": pred, "correct": math_correct(pred, record["answer"])}
    return {}


def evaluate(model, tokenizer, tasks, *, output: str | Path | None = None, engine: str | None = None,
             **kwargs) -> dict:
    """Metrics per dataset and their average; writes results JSON and predictions JSONL if `output`.
    `engine` runs mode "generate" (`ENGINES`, the first by default; "slots" turns the model into its
    inference form first)."""
    datasets = check_evaluation(tasks, kwargs.get("mode", "generate"), engine)
    generating = kwargs.get("mode", "generate") == "generate"
    engine = engine or ENGINES[0]
    if generating:
        kwargs["generator"] = text_generator(model, tokenizer, engine, kwargs.get("batch_size", 8))
    results, predictions = {}, {}
    for dataset in datasets:
        results[dataset], predictions[dataset] = evaluate_dataset(model, tokenizer, dataset, **kwargs)
    main_metric = ("nll" if kwargs.get("mode") == "nll" else
                   "rougeL" if all(family_of(d) == "summary" for d in results) else "accuracy")
    summary = {
        "datasets": results,
        "average": sum(r[main_metric] for r in results.values()) / len(results),
        "metric": main_metric,
        **({"best_constant_average": sum(r["best_constant"]["accuracy"] for r in results.values()) / len(results)}
           if all("best_constant" in r for r in results.values()) else {}),
        **({f"{k}_average": sum(r[k] for r in results.values()) / len(results) for k in ("accuracy_norm", "chance", "nll")}
           if all("accuracy_norm" in r for r in results.values()) else {}),
        **{k: v for k, v in kwargs.items() if k in ("limit", "mode", "form")},
        **({"engine": engine} if generating else {}),
    }
    if output:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(summary, indent=2) + "\n")
        with open(output.with_suffix(".predictions.jsonl"), "w") as f:
            for dataset, rows in predictions.items():
                for row in rows:
                    f.write(json.dumps({"dataset": dataset, **row}) + "\n")
    return summary


def format_table(summary: dict, title: str = "") -> str:
    """A markdown table of one evaluation summary."""
    metric = summary["metric"]
    lines = [title] if title else []
    if "accuracy_norm_average" in summary:  # scored on the choices' own texts
        lines += ["| dataset | n | acc (%) | acc_norm (%) | chance (%) | gold answer NLL / token |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {d} | {r['n']} | {r['accuracy']:.1f} | {r['accuracy_norm']:.1f} | {r['chance']:.1f} | {r['nll']:.3f} |"
                  for d, r in summary["datasets"].items()]
        lines.append(f"| **average** | | **{summary['average']:.1f}** | **{summary['accuracy_norm_average']:.1f}** | "
                     f"{summary['chance_average']:.1f} | {summary['nll_average']:.3f} |")
    elif metric == "nll":
        lines += ["| dataset | n | reference NLL / token (mean over items) | per token over all |", "|---|---:|---:|---:|"]
        lines += [f"| {d} | {r['n']} | {r['nll']:.4f} | {r['nll_per_token']:.4f} |" for d, r in summary["datasets"].items()]
        lines.append(f"| **average** | | **{summary['average']:.4f}** | |")
    elif metric == "accuracy":
        lines += ["| dataset | n | accuracy (%) | best constant answer (%) | predicted labels |", "|---|---:|---:|---:|---|"]
        for d, r in summary["datasets"].items():
            constant = r.get("best_constant")
            lines.append(f"| {d} | {r['n']} | {r['accuracy']:.1f} | "
                         + (f"{constant['accuracy']:.1f} (always {constant['label']})" if constant else "-") + " | "
                         + (", ".join(f"{k}: {v}" for k, v in r["predicted_labels"].items())
                            if "predicted_labels" in r else "-") + " |")
        constant_avg = summary.get("best_constant_average")
        lines.append(f"| **average** | | **{summary['average']:.1f}** | "
                     + (f"{constant_avg:.1f}" if constant_avg is not None else "-") + " | |")
    else:
        lines += ["| dataset | n | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {d} | {r['n']} | {r['rouge1']:.1f} | {r['rouge2']:.1f} | {r['rougeL']:.1f} |"
                  for d, r in summary["datasets"].items()]
    return "\n".join(lines)
