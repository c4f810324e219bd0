"""The serving engine: requests for different adapters share continuous-batching steps."""

import pytest
import torch
from conftest import make_model, randomize_adapters
from transformers import GenerationConfig

import fflora
from fflora.bank import BASE_NAME
from fflora.serving import BankEngine

CONFIGS = {"ffba": fflora.FFBAConfig(r=4, alpha=8), "ba": fflora.FFBAConfig(r=8, forward=False)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, config) in enumerate(CONFIGS.items(), start=1):
        model = fflora.apply_ffba(make_model("llama", max_position_embeddings=512), config)
        randomize_adapters(model, seed=seed)
        fflora.save_adapter(model, root / name)
    return root


def _bank(saved):
    model = fflora.fuse(make_model("llama", max_position_embeddings=512), max_adapters=2)
    for name in CONFIGS:
        fflora.load_adapter(model, saved / name, adapter_name=name)
    return model


@torch.no_grad()
def test_concurrent_requests_for_different_adapters_equal_each_alone(saved, monkeypatch):
    import fflora.serving.engine as engine_module

    steps = []  # the adapters of each packed step's segments

    def recording(model, names, lengths):
        steps.append(list(names))
        return fflora.select_adapters(model, names, lengths=lengths)

    monkeypatch.setattr(engine_module, "select_adapters", recording)
    config = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0)
    requests = [([5, 6, 7, 8], "ffba"), ([9, 10, 11], BASE_NAME), ([12, 13, 14, 15, 16], "ba"), ([17, 18], "ffba")]
    model = _bank(saved)
    engine = BankEngine(model, config)
    ids = [engine.add_request(prompt, adapter=name) for prompt, name in requests]  # queued before the first step
    with engine:
        outputs = [engine.wait(rid) for rid in ids]
    assert "forward" not in model.__dict__  # the model's own forward is back
    assert max(len(set(names)) for names in steps) == 3  # ffba, base and ba requests shared steps
    for (prompt, name), output in zip(requests, outputs):
        alone = make_model("llama", max_position_embeddings=512)
        if name != BASE_NAME:
            fflora.load_adapter(alone, saved / name)
        expected = fflora.fuse(alone).generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):]
        assert output.generated_tokens == expected.tolist(), name


def test_unknown_adapter_is_refused_with_the_loaded_names(saved):
    engine = BankEngine(_bank(saved), GenerationConfig(max_new_tokens=2, eos_token_id=-1))
    with pytest.raises(ValueError, match=r"no adapter named 'nope' is loaded; loaded adapters: \['ffba', 'ba'\]"):
        engine.add_request([1, 2, 3], adapter="nope")
    with pytest.raises(ValueError, match="has no adapter bank"):
        BankEngine(make_model("llama"))


@torch.no_grad()
def test_streaming_yields_each_token_as_it_comes(saved):
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with BankEngine(_bank(saved), config) as engine:
        streamed = [list(o.generated_tokens) for o in engine.results(engine.add_request([5, 6, 7], "ba", streaming=True))]
        whole = engine.wait(engine.add_request([5, 6, 7], "ba")).generated_tokens
    assert [len(tokens) for tokens in streamed] == [1, 2, 3, 4]
    assert streamed[-1] == whole and all(a == whole[: len(a)] for a in streamed)
