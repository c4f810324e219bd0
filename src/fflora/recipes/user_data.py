"""A user's own training data (`fflora train --data FILE_OR_DIR`): read, its format detected, split.

Accepted: a JSONL file (one JSON object per line), a JSON file holding a list of objects, or a
folder written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict whose "train" split is
used). Every record of one source has one of the formats TRL and PEFT users already keep:

* chat: {"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}:
  trained on the last assistant turn, the turns before it rendered by the tokenizer's chat template;
* prompt/response: {"prompt": ..., "completion": ...} (TRL's name), "response" or "output" for the
  answer (with Alpaca's "instruction" and optional "input" as the prompt): the prompt rendered as a
  user turn (or Alpaca's template for a model without a chat template), trained on the response;
* plain text: {"text": ...}: trained on every token (language modelling).

Records come out canonical for `fflora.recipes.prompts` ({"id", "dataset": "user", ...}), so the
packing, dtype and losses of the built-in tasks apply unchanged. The held-out split is a fixed draw
(`DEV_SEED`), so `fflora eval --data` scores the very records a run held out.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..utils.files import json_lines

FORMATS = {
    "chat": "chat messages (trained on the last assistant turn)",
    "prompt/response": "prompt/response pairs (trained on the response)",
    "text": "plain text (trained on every token)",
}
_ANSWER_KEYS = ("completion", "response", "output")
DEV_SEED = 20251031
DEV_SHARE, DEV_MAX = 0.05, 200  # the default held-out split: 5% of the records, at most 200


def default_dev_size(count: int) -> int:
    """Records held out of `count` when the run names no dev size: 5%, at least 1, at most 200."""
    return max(1, min(DEV_MAX, int(count * DEV_SHARE)))


def _read(path: Path) -> list[dict]:
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            data = load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"{path} is a folder but not one `datasets` saved (save_to_disk); give a JSONL file or "
                             "such a folder") from e
        if isinstance(data, DatasetDict):
            if "train" not in data:
                raise ValueError(f"{path} holds the splits {sorted(data)}, none named 'train'")
            data = data["train"]
        return [dict(row) for row in data]
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for number, line in enumerate(json_lines(text), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: not JSON ({e.msg}); --data takes one JSON object per "
                                     "line (JSONL)") from None
    if not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: every record must be a JSON object")
    return rows


def detect_format(row: dict) -> str:
    """The format of one record, or a ValueError that lists the three accepted ones."""
    if "messages" in row:
        return "chat"
    if ("prompt" in row or "instruction" in row) and any(k in row for k in _ANSWER_KEYS):
        return "prompt/response"
    if "text" in row:
        return "text"
    raise ValueError(f"a record with the keys {sorted(row)} is none of the formats --data takes: chat "
                     "({\"messages\": [...]}), prompt/response ({\"prompt\", \"completion\"} or \"response\"/"
                     "\"output\"; Alpaca's \"instruction\"/\"input\"/\"output\"), or plain text ({\"text\"})")


def _canonical(row: dict, kind: str, index: int, where: str) -> dict:
    record = {"id": f"user-{index}", "dataset": "user"}
    if kind == "chat":
        messages = row["messages"]
        if (not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages)
                or messages[-1].get("role") != "assistant"):
            raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} turns ending with an "
                             "assistant turn (the one trained on)")
        return record | {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if kind == "prompt/response":
        prompt = row.get("prompt")
        if prompt is None:
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        response = next(row[k] for k in _ANSWER_KEYS if k in row)
        if not isinstance(prompt, str) or not isinstance(response, str) or not response:
            raise ValueError(f"{where}: the prompt and the response must be strings, the response not empty")
        return record | {"prompt": prompt, "response": response}
    if not isinstance(row["text"], str) or not row["text"]:
        raise ValueError(f"{where}: 'text' must be a non-empty string")
    return record | {"text": row["text"]}


def load_user_records(path: str | Path) -> tuple[list[dict], str]:
    """(canonical records, their format) of a user's data; every record must share the first one's format."""
    path = Path(path)
    rows = _read(path)
    if not rows:
        raise ValueError(f"--data {path} holds no records")
    kind = detect_format(rows[0])
    records = []
    for i, row in enumerate(rows):
        where = f"{path}, record {i + 1}"
        if detect_format(row) != kind:
            raise ValueError(f"{where} is {detect_format(row)}, the first record {kind}: one format per file")
        records.append(_canonical(row, kind, i, where))
    return records, kind


def split_user_records(records: list[dict], dev_size: int) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records): a fixed draw of `dev_size` held out."""
    if dev_size >= len(records):
        raise ValueError(f"--dev-size {dev_size} holds out all {len(records)} records; leave some to train on")
    held = set(random.Random(DEV_SEED).sample(range(len(records)), dev_size))
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def split_user_data(path: str | Path, dev_size: int = 0) -> tuple[list[dict], list[dict], str]:
    """(training records, held-out records, their format) of a run on `path`: `dev_size` held out, or by
    default 5% (at most 200)."""
    records, kind = load_user_records(path)
    return (*split_user_records(records, dev_size or default_dev_size(len(records))), kind)


def held_out_user_records(path: str | Path, dev_size: int = 0) -> list[dict]:
    """The records a run on `path` holds out (`split_user_data`)."""
    return split_user_data(path, dev_size)[1]
