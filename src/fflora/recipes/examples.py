"""Tokenized examples, packed batches, and the loss on the response tokens alone.

One place for what training, the dev loss and the log-likelihood scorers share:

* `tokenize_example`: a canonical record in a data form -> input_ids and labels (the prompt
  masked with -100). Forms: "instruction" (LLM-Adapters' instruction prompt, chat-rendered for
  instruct models: the label response for commonsense, the rationale for math, the summary) and
  "cloze" (multiple-choice sets: the question as plain text, then the gold choice's own text, the
  same (context, continuation) pair `choice_text_pairs` scores).
* `pack`: a list of examples -> one row, no padding (transformers' `DataCollatorWithFlattening`):
  position ids restart at every example, from which transformers builds a block-diagonal causal
  mask, so no token attends across examples and no compute goes to padding.
* `packed_attention`: transformers' SDPA on the examples of a packed row side by side (one causal
  call, no mask), registered as the attention implementation `PACKED_ATTENTION`, which
  `packed_attention_while` switches an SDPA model to for training and for `example_nll`. Without it
  SDPA takes the packed row's block-diagonal mask as a dense one and computes every masked block: on
  SmolLM2 with 8 examples of ~110 tokens, half of a training step's time went to attention; scoring
  16 math rationales a row, 1.7x the time (`benchmarks/packed_nll.py`).
* `token_nll`: the next-token NLL at every labelled position, with the LM head run on those
  positions only (`logits_to_keep` as a boolean mask). At 135M the LM head (49,152 x 576) is the
  largest GEMM of the model, and a cloze example labels 2-20 of its ~60 tokens.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DataCollatorWithFlattening
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .prompts import choice_text_pairs, instruction_and_response, render_prompt, response_suffix
from .settings import FORMS

IGNORE = -100


def check_form(form: str, records: list[dict]) -> None:
    """Refuse a form the records cannot take (cloze needs multiple-choice records)."""
    if form not in FORMS:
        raise ValueError(f"unknown data form {form!r}; choose one of {list(FORMS)}")
    if form == "cloze" and records and "choices" not in records[0]:
        raise ValueError(f"form 'cloze' scores and trains the answer's own text of multiple-choice sets; "
                         f"{records[0].get('dataset', 'these records')} is not one: use form 'instruction'")


def prompt_and_response(tokenizer, record: dict, form: str = "instruction") -> tuple[str, str]:
    """The two texts of a record in a form: what the model reads, and what it learns to write."""
    if form == "cloze":
        return choice_text_pairs(record)[record["label"]]
    if "messages" in record:  # a user's chat: the turns before the last, then the assistant's last turn
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat-format data needs a tokenizer with a chat template; this model has none: give "
                             "prompt/response pairs instead")
        prompt = tokenizer.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, tokenize=False)
        return prompt, record["messages"][-1]["content"] + response_suffix(tokenizer)
    if "text" in record:  # a user's plain text: every token is trained on
        return "", record["text"] + response_suffix(tokenizer)
    instruction, response = instruction_and_response(record)
    return render_prompt(tokenizer, instruction), response + response_suffix(tokenizer)


def continuation_example(prompt_ids: list[int], response_ids: list[int], max_length: int) -> dict | None:
    """input_ids / labels (prompt masked) cut to max_length; None if no response token is left."""
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def tokenize_example(tokenizer, record: dict, max_length: int, form: str = "instruction") -> dict | None:
    """input_ids / labels of a record in a form; None if truncation leaves no response token."""
    prompt, response = prompt_and_response(tokenizer, record, form)
    return continuation_example(tokenizer(prompt, add_special_tokens=False)["input_ids"],
                                tokenizer(response, add_special_tokens=False)["input_ids"], max_length)


_FLATTEN = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True)


def pack(examples: list[dict]) -> dict:
    """One (1, total tokens) row: input_ids, labels (-100 at each example's first token),
    position_ids restarting at 0 for every example, and the examples' boundaries (`cu_seq_lens_q`,
    ..., the keywords transformers' attention functions take); no attention_mask, no padding."""
    return _FLATTEN([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])


PACKED_ATTENTION = "fflora_packed_sdpa"


def packed_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers' SDPA with the examples of a packed row side by side, each right-padded to the
    longest (the padding is in attention only, never in the projections); any other batch runs
    plain SDPA. Right padding needs no mask: a causal query never reaches the padded keys after
    it. A sliding-window layer (Gemma 3, Mistral) shorter than the longest example gets the band."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    lengths = cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
    count, width = len(lengths), int(max_length_q)
    example = torch.repeat_interleave(torch.arange(count, device=query.device), lengths.to(query.device))
    slot = example * width + torch.arange(query.shape[2], device=query.device) - cu_seq_lens_q.to(query.device)[example]

    def side_by_side(x):  # (1, heads, tokens, dim) -> (examples, heads, width, dim)
        rows = x[0].transpose(0, 1)
        return rows.new_zeros(count * width, *rows.shape[1:]).index_copy(0, slot, rows) \
            .view(count, width, *rows.shape[1:]).transpose(1, 2)

    window = getattr(module, "sliding_window", None)
    band = None
    if window and width > window:
        i = torch.arange(width, device=query.device)
        band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    out = sdpa_attention_forward(module, side_by_side(query), side_by_side(key), side_by_side(value), band, **kwargs)[0]
    return out.reshape(count * width, *out.shape[2:]).index_select(0, slot).unsqueeze(0), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def packed_attention_while(model, packing: bool = True):
    """Switch an SDPA model to `packed_attention` while it runs on packed rows (training, or scoring
    in `example_nll`); a model with another attention implementation is left as it is."""
    config = model.config
    before = config._attn_implementation
    if packing and before == "sdpa":
        config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def label_mask(labels: torch.Tensor) -> torch.Tensor:
    """(batch, length) bool: the positions whose next token is labelled (the logits the loss needs)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def token_nll(model, batch: dict) -> torch.Tensor:
    """Float32 NLL of every labelled token of `batch` (packed or padded), in row-major order,
    computing logits at the labelled positions only."""
    labels = batch["labels"]
    keep = label_mask(labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # No cache: transformers builds the packed (block-diagonal) mask only without one.
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1])  # (labelled tokens, vocab)
    targets = labels[:, 1:][keep[:, :-1]]
    return F.cross_entropy(logits.float(), targets, reduction="none")


def owners(batch: dict) -> torch.Tensor:
    """For each labelled token of a packed batch (the order of `token_nll`), its example's index."""
    starts = (batch["position_ids"] == 0).cumsum(-1) - 1
    return starts[label_mask(batch["labels"])]


@torch.no_grad()
def example_nll(model, examples: list[dict], batch_size: int = 8, progress=None) -> list[tuple[float, int]]:
    """(summed NLL, labelled tokens) of each example, `batch_size` examples packed per forward pass."""
    was_training = model.training
    model.eval()
    out: list[tuple[float, int]] = []
    starts = range(0, len(examples), batch_size)
    with packed_attention_while(model):
        for start in progress(starts) if progress else starts:
            chunk = examples[start : start + batch_size]
            batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in pack(chunk).items()}
            nll, owner = token_nll(model, batch), owners(batch)
            sums = torch.zeros(len(chunk), device=nll.device).index_add_(0, owner, nll)
            counts = torch.bincount(owner, minlength=len(chunk))
            out += [(s, int(c)) for s, c in zip(sums.tolist(), counts.tolist())]
    model.train(was_training)
    return out
