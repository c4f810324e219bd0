"""The serving engine: requests for different adapters share continuous-batching steps."""

import pytest
import torch
from conftest import make_model, randomize_adapters
from transformers import ContinuousBatchingConfig, GenerationConfig

import fflora
from fflora.methods.ffba.bank import BASE_NAME, AdapterBank
from fflora.serving import BankEngine, sampling_generation_config

CONFIGS = {"ffba": fflora.FFBAConfig(r=4, alpha=8), "ba": fflora.FFBAConfig(r=8, forward=False)}


def _llama(layers=3):
    return make_model("llama", max_position_embeddings=512, num_hidden_layers=layers)


def _save_adapters(root, layers=3):
    for seed, (name, config) in enumerate(CONFIGS.items(), start=1):
        model = fflora.apply_ffba(_llama(layers), config)
        randomize_adapters(model, seed=seed)
        fflora.save_adapter(model, root / name)
    return root


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _save_adapters(tmp_path_factory.mktemp("adapters"))


def _bank(saved, max_adapters=2, layers=3):
    fused = fflora.FusedModel.build(_llama(layers), max_adapters=max_adapters)
    for name in CONFIGS:
        fused.load(name, saved / name)
    return fused


@torch.no_grad()
def test_concurrent_requests_for_different_adapters_equal_each_alone(saved, monkeypatch):
    steps = []  # the adapters of each packed step's segments
    selected = AdapterBank.selected

    def recording(bank, names, lengths, rearrange):
        assert rearrange is False  # the engine never moves adapters between steps
        steps.append(list(names))
        return selected(bank, names, lengths=lengths, rearrange=rearrange)

    monkeypatch.setattr(AdapterBank, "selected", recording)
    config = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0)
    requests = [([5, 6, 7, 8], "ffba"), ([9, 10, 11], BASE_NAME), ([12, 13, 14, 15, 16], "ba"), ([17, 18], "ffba")]
    fused = _bank(saved)
    engine = BankEngine(fused, config)
    ids = [engine.add_request(prompt, adapter=name) for prompt, name in requests]  # queued before the first step
    with engine:
        outputs = [engine.wait(rid) for rid in ids]
    assert "forward" not in fused.model.__dict__  # the model's own forward is back
    assert max(len(set(names)) for names in steps) == 3  # ffba, base and ba requests shared steps
    for (prompt, name), output in zip(requests, outputs):
        assert output.generated_tokens == _alone(saved, name, prompt, config), name


def test_unknown_adapter_is_refused_with_the_loaded_names(saved):
    engine = BankEngine(_bank(saved), GenerationConfig(max_new_tokens=2, eos_token_id=-1))
    with pytest.raises(ValueError, match=r"no adapter named 'nope' is loaded; loaded adapters: \['ffba', 'ba'\]"):
        engine.add_request([1, 2, 3], adapter="nope")
    assert engine.manager.output_router.result_handlers == {} and engine.running_requests() == {}  # nothing left behind
    with pytest.raises(TypeError, match=r"serves a FusedModel with an adapter bank, got a LlamaForCausalLM: pass "
                                        r"fflora.FusedModel.build\(model, max_adapters=K\)"):
        BankEngine(make_model("llama"))
    with pytest.raises(ValueError, match="needs an adapter bank: build the FusedModel with max_adapters=K"):
        BankEngine(fflora.FusedModel.build(make_model("llama")))


@torch.no_grad()
def test_streaming_yields_each_token_as_it_comes(saved):
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with BankEngine(_bank(saved), config) as engine:
        streamed = [list(o.generated_tokens) for o in engine.results(engine.add_request([5, 6, 7], "ba", streaming=True))]
        whole = engine.wait(engine.add_request([5, 6, 7], "ba")).generated_tokens
    assert [len(tokens) for tokens in streamed] == [1, 2, 3, 4]
    assert streamed[-1] == whole and all(a == whole[: len(a)] for a in streamed)
    with pytest.raises(KeyError, match="no request 'req-nope' to read"):
        next(engine.results("req-nope"))


def _alone(saved, name, prompt, config, layers=3):
    model = _llama(layers)
    if name != BASE_NAME:
        fflora.load_adapter(model, saved / name)
    return fflora.fuse(model).generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()


GREEDY = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)


@torch.no_grad()
def test_per_request_sampling_greedy_rows_equal_generate(saved):
    """Under a sampling config, temperature 0 (and a vanishing top_p) give exactly the greedy tokens."""
    config = sampling_generation_config(max_new_tokens=6, eos_token_id=-1, pad_token_id=0)
    with BankEngine(_bank(saved), config) as engine:
        greedy = engine.add_request([5, 6, 7, 8], "ffba", temperature=0.0)
        nucleus = engine.add_request([9, 10, 11], "ba", temperature=0.7, top_p=1e-6)  # only the top token survives
        sampled = engine.add_request([9, 10, 11], BASE_NAME, temperature=1.5)
        outputs = [engine.wait(rid).generated_tokens for rid in (greedy, nucleus, sampled)]
    assert outputs[0] == _alone(saved, "ffba", [5, 6, 7, 8], GREEDY)
    assert outputs[1] == _alone(saved, "ba", [9, 10, 11], GREEDY)
    assert len(outputs[2]) == 6
    with pytest.raises(ValueError, match="decodes greedily for every request"):
        BankEngine(_bank(saved), GREEDY).add_request([1, 2], temperature=0.8)


@torch.no_grad()
def test_a_cached_prefix_is_never_shared_between_adapters(saved):
    """Same long prompt, one adapter after the other: prefix caching would reuse the first one's KV."""
    prompt = [(7 * i) % 120 + 3 for i in range(40)]  # two full 16-token pages would be shared
    cb = ContinuousBatchingConfig(page_size=16, allow_block_sharing=True, return_logprobs=True)
    with BankEngine(_bank(saved), GREEDY, cb) as engine:
        outputs = {name: engine.wait(engine.add_request(prompt, name)) for name in ("ffba", BASE_NAME, "ba")}
    for name, output in outputs.items():
        model = _llama()
        if name != BASE_NAME:
            fflora.load_adapter(model, saved / name)
        out = fflora.fuse(model).generate(torch.tensor([prompt]), generation_config=GREEDY,
                                          output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, len(prompt):]
        logprobs = [torch.log_softmax(step[0], -1)[t].item() for step, t in zip(out.logits, tokens)]
        assert output.generated_tokens == tokens.tolist(), name
        assert output.logprobs == pytest.approx(logprobs, abs=1e-4), name


@torch.no_grad()
def test_adapters_load_and_unload_while_requests_run(saved):
    config = GenerationConfig(max_new_tokens=40, do_sample=False, eos_token_id=-1, pad_token_id=0)
    engine = BankEngine(_bank(saved, max_adapters=3), config)
    with engine:
        long_ffba = engine.add_request([5, 6, 7], "ffba", streaming=True)
        stream = engine.results(long_ffba)
        next(stream)  # running
        engine.unload_adapter("ffba")  # new requests can no longer use it; the running one finishes on it
        assert engine.adapters() == ["ba"] and "ffba" in engine.bank.names()
        with pytest.raises(ValueError, match=r"no adapter named 'ffba' is loaded; loaded adapters: \['ba'\]"):
            engine.add_request([1, 2], "ffba")
        with pytest.raises(ValueError, match="still has requests running"):
            engine.load_adapter(saved / "ffba", "ffba")
        engine.load_adapter(saved / "ffba", "ffba2")  # joins while the other request runs
        second = engine.add_request([9, 10, 11], "ffba2", max_new_tokens=6)
        *_, last = stream
        assert last.generated_tokens == _alone(saved, "ffba", [5, 6, 7], config)
        assert engine.wait(second).generated_tokens == _alone(saved, "ffba", [9, 10, 11], GREEDY)
        engine.load_adapter(saved / "ffba", "ffba")  # its old rows were freed: the name is free again
        assert engine.adapters() == ["ba", "ffba2", "ffba"]
        with pytest.raises(KeyError, match="no adapter named 'nope' is loaded"):
            engine.unload_adapter("nope")
        with pytest.raises(ValueError, match="the adapter bank is full"):
            engine.load_adapter(saved / "ba", "ba2")
        assert engine.wait(engine.add_request([9, 10, 11], "ba", max_new_tokens=6)).generated_tokens == \
            _alone(saved, "ba", [9, 10, 11], GREEDY)  # still serving after the refused load


@torch.no_grad()
def test_leaving_a_stream_early_cancels_the_request(saved):
    import asyncio
    import contextlib

    async def two_tokens_then_leave(engine):
        async with contextlib.aclosing(engine.stream([5, 6, 7], "ffba", max_new_tokens=200)) as stream:
            async for output in stream:
                if len(output.generated_tokens) == 2:
                    break
        assert engine.running_requests() == {}
        for _ in range(100):  # the scheduler drops it at its next step
            if engine.scheduled_requests() == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.scheduled_requests() == 0
        return [o.generated_tokens async for o in engine.stream([5, 6, 7], "ba", max_new_tokens=6)][-1]

    with BankEngine(_bank(saved), GREEDY) as engine:
        tokens = asyncio.run(two_tokens_then_leave(engine))
        assert engine.is_running()
    assert tokens == _alone(saved, "ba", [5, 6, 7], GREEDY)


MIXES = [[([5, 6, 7, 8], "ffba"), ([9, 10, 11], BASE_NAME), ([12, 13, 14, 15, 16], "ba")],
         [([17, 18], "ba"), ([19, 20, 21, 22, 23, 24, 25], "ffba")]]


def _each_mix_equals_each_request_alone(engine, saved, layers):
    for requests in MIXES:
        ids = [engine.add_request(prompt, adapter=name) for prompt, name in requests]
        for (prompt, name), rid in zip(requests, ids):
            assert engine.wait(rid).generated_tokens == _alone(saved, name, prompt, GREEDY, layers), name


@torch.no_grad()
def test_fixed_windows_hold_each_steps_selection(saved):
    """What a compiled engine runs, eagerly: every GEMM covers the whole room and each step's
    selection (its packed segments' adapters) is held in the bank's step."""
    fused = _bank(saved)
    fused.bank.fix_windows()
    with BankEngine(fused, GREEDY) as engine:
        _each_mix_equals_each_request_alone(engine, saved, layers=3)
    assert fused.bank.step.selection is None  # nothing held once stopped


@pytest.mark.slow
@torch.no_grad()
def test_a_compiled_engine_gives_each_request_its_adapters_tokens(tmp_path):
    """Compiled steps (inductor, dynamic token counts, the engine's thread in the compile settings'
    context), on one layer: tracing a step of transformers' engine takes minutes (graph breaks in
    its paged cache), hence slow."""
    fused = _bank(_save_adapters(tmp_path, layers=1), layers=1)
    cb = ContinuousBatchingConfig(max_batch_tokens=32, page_size=16)
    with BankEngine(fused, GREEDY, cb, compile=True) as engine:
        assert engine.compile_seconds > 0 and fused.bank.step.fixed
        _each_mix_equals_each_request_alone(engine, tmp_path, layers=1)


def test_compiling_the_engine_needs_a_bank():
    with pytest.raises(ValueError, match=r"has no adapter bank; create one with fflora.fuse\(model, max_adapters=K\)"):
        fflora.FusedModel.build(make_model("llama")).compile_engine(ContinuousBatchingConfig())
