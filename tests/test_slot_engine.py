"""fflora's slot engine (`fflora.serving.slot_engine`): requests for different adapters in static KV-cache
slots, joining and leaving between steps, prompts in chunks, each generating what it generates alone."""

import asyncio
import contextlib
import threading

import pytest
import torch
from conftest import make_model, randomize_adapters
from torch._dynamo.utils import counters
from transformers import GenerationConfig

import fflora
from fflora import BASE_NAME
from fflora.serving.slot_engine import SlotEngine

CONFIGS = {"ffba": fflora.FFBAConfig(r=4, alpha=8), "ba": fflora.FFBAConfig(r=8, forward=False)}
GREEDY = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17, 18], [19, 20], [21, 22, 23, 24, 25]]


def _llama():
    return make_model("llama", max_position_embeddings=128, num_hidden_layers=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, config) in enumerate(CONFIGS.items(), start=1):
        model = fflora.apply_ffba(_llama(), config)
        randomize_adapters(model, seed=seed)
        fflora.save_adapter(model, root / name)
    return root


def _bank(saved, max_adapters=3):
    fused = fflora.FusedModel.build(_llama(), max_adapters=max_adapters)
    for name in CONFIGS:
        fused.load(name, saved / name)
    return fused


@torch.no_grad()
def _alone(saved, adapter, prompt, new_tokens):
    model = _llama()
    if adapter != BASE_NAME:
        fflora.load_adapter(model, saved / adapter)
    out = fflora.fuse(model).generate(torch.tensor([prompt]), generation_config=GREEDY, max_new_tokens=new_tokens)
    return out[0, len(prompt):].tolist()


def test_more_requests_than_slots_in_chunks_each_equal_its_adapter_alone(saved):
    """Three slots for five requests (two wait, then join as others leave), prompts in chunks of 3 tokens."""
    adapters = ["ffba", BASE_NAME, "ba", "ffba", "ba"]
    lengths = [6, 3, 5, 4, 2]
    with SlotEngine(_bank(saved), slots=3, max_len=64, max_batch_tokens=3, eos_token_id=[]) as engine:
        with engine.paused():  # all five queued before the first step
            ids = [engine.add_request(p, a, max_new_tokens=n) for p, a, n in zip(PROMPTS, adapters, lengths)]
            assert engine.scheduled_requests() == 5 and engine.running_requests()["ffba"] == 2
        outputs = [engine.wait(i) for i in ids]
        assert engine.scheduled_requests() == 0 and engine.running_requests() == {}
    for output, prompt, adapter, n in zip(outputs, PROMPTS, adapters, lengths):
        assert output.is_finished() and output.generated_tokens == _alone(saved, adapter, prompt, n), adapter


def test_a_burst_of_prompts_is_prefilled_several_at_a_time_each_equal_its_adapter_alone(saved):
    """Five requests at once, 8 prompt tokens a step: the first waiting prompt's chunk sets the width and
    the next ones join, right-padded, while rows x width fits (prompts of 4, 3, 7, 2 and 5 tokens)."""
    adapters = ["ffba", "ba", BASE_NAME, "ba", "ffba"]
    engine = SlotEngine(_bank(saved), slots=5, max_len=64, max_batch_tokens=8, eos_token_id=[])
    shapes, run = [], engine._run
    engine._run = lambda requests, ids, *rest: shapes.append(tuple(ids.shape)) or run(requests, ids, *rest)
    with engine:
        with engine.paused():  # all five queued before the first step
            ids = [engine.add_request(p, a, max_new_tokens=4) for p, a in zip(PROMPTS, adapters)]
        outputs = [engine.wait(i) for i in ids]
    assert [s for s in shapes if s[1] > 1] == [(2, 4), (1, 7), (2, 2), (1, 3)]
    for output, prompt, adapter in zip(outputs, PROMPTS, adapters):
        assert output.generated_tokens == _alone(saved, adapter, prompt, 4), adapter


def test_a_request_that_joins_while_others_decode_and_eos_ends_a_request(saved):
    with SlotEngine(_bank(saved), slots=2, max_len=64, eos_token_id=[]) as engine:
        long = engine.add_request(PROMPTS[2], "ba", max_new_tokens=12, streaming=True)
        stream = engine.results(long)
        next(stream)  # decoding
        late = engine.add_request(PROMPTS[0], "ffba", max_new_tokens=5)
        assert engine.wait(late).generated_tokens == _alone(saved, "ffba", PROMPTS[0], 5)
        *_, last = stream
        assert last.generated_tokens == _alone(saved, "ba", PROMPTS[2], 12)
    first = _alone(saved, "ffba", PROMPTS[1], 6)
    with SlotEngine(_bank(saved), slots=1, max_len=64, eos_token_id=first[0]) as engine:  # ends at its first token
        stopped = engine.wait(engine.add_request(PROMPTS[1], "ffba", max_new_tokens=6))
        assert (stopped.generated_tokens, stopped.finish_reason) == (first[:1], "stop")
        ignoring = engine.wait(engine.add_request(PROMPTS[1], "ffba", max_new_tokens=6, ignore_eos=True))
        assert (ignoring.generated_tokens, ignoring.finish_reason) == (first, "length")
    with SlotEngine(_bank(saved), slots=1, max_len=64, eos_token_id=first[-1]) as engine:
        # Ignoring the end-of-sequence token and ending on it all the same: it ended by its length.
        ignoring = engine.wait(engine.add_request(PROMPTS[1], "ffba", max_new_tokens=6, ignore_eos=True))
        assert (ignoring.generated_tokens, ignoring.finish_reason) == (first, "length")


def test_sampling_rows_and_greedy_rows_share_a_step(saved):
    with SlotEngine(_bank(saved), slots=3, max_len=64, eos_token_id=[]) as engine:
        nucleus = engine.add_request(PROMPTS[0], "ba", max_new_tokens=5, temperature=0.7, top_p=1e-6)  # the top token only
        sampled = engine.add_request(PROMPTS[1], BASE_NAME, max_new_tokens=5, temperature=1.5)
        greedy = engine.add_request(PROMPTS[3], "ffba", max_new_tokens=5)
        tokens = [engine.wait(i).generated_tokens for i in (nucleus, sampled, greedy)]
    assert tokens[0] == _alone(saved, "ba", PROMPTS[0], 5) and len(tokens[1]) == 5
    assert tokens[2] == _alone(saved, "ffba", PROMPTS[3], 5)


def test_a_seed_repeats_a_requests_samples_whatever_runs_beside_it(saved):
    with SlotEngine(_bank(saved), slots=3, max_len=64, eos_token_id=[]) as engine:
        def sample(seed, beside):
            with engine.paused():  # queued together: they share steps
                rid = engine.add_request(PROMPTS[0], "ba", max_new_tokens=8, temperature=1.5, seed=seed)
                others = [engine.add_request(PROMPTS[1], BASE_NAME, max_new_tokens=8, temperature=1.5) for _ in range(beside)]
            tokens = engine.wait(rid).generated_tokens
            for other in others:
                engine.wait(other)
            return tokens

        first = sample(7, beside=0)
        assert sample(7, beside=2) == first  # the global random stream moved between them: not used
        assert any(sample(seed, beside=0) != first for seed in (8, 9, 10))


def test_streaming_gives_each_token_as_it_comes(saved):
    with SlotEngine(_bank(saved), slots=1, max_len=64, eos_token_id=[]) as engine:
        streamed = [list(o.generated_tokens) for o in engine.results(engine.add_request(PROMPTS[0], "ba", 4, streaming=True))]
        whole = engine.wait(engine.add_request(PROMPTS[0], "ba", 4)).generated_tokens
    assert streamed == [whole[:1], whole[:2], whole[:3], whole] and whole == _alone(saved, "ba", PROMPTS[0], 4)
    with pytest.raises(KeyError, match="no request 'req-nope' to read"):
        next(engine.results("req-nope"))


def test_leaving_a_stream_early_frees_its_slot(saved):
    async def two_tokens_then_leave(engine):
        async with contextlib.aclosing(engine.stream(PROMPTS[0], "ffba", max_new_tokens=40)) as stream:
            async for output in stream:
                if len(output.generated_tokens) == 2:
                    break
        for _ in range(100):  # the slot frees at the next step
            if engine.scheduled_requests() == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.scheduled_requests() == 0
        return [o.generated_tokens async for o in engine.stream(PROMPTS[1], "ba", max_new_tokens=4)][-1]

    with SlotEngine(_bank(saved), slots=1, max_len=64, eos_token_id=[]) as engine:
        assert asyncio.run(two_tokens_then_leave(engine)) == _alone(saved, "ba", PROMPTS[1], 4)


def test_adapters_load_between_steps_and_an_unloaded_one_leaves_once_its_requests_finish(saved):
    with SlotEngine(_bank(saved), slots=2, max_len=128, eos_token_id=[]) as engine:
        with engine.paused():  # between two steps: the request below is queued, not yet finished
            running = engine.add_request(PROMPTS[3], "ffba", max_new_tokens=40)
            engine.unload_adapter("ffba")  # new requests are refused; the queued one still runs on it
            assert engine.adapters() == ["ba"] and "ffba" in engine.bank.names()
            with pytest.raises(ValueError, match=r"no adapter named 'ffba' is loaded; loaded adapters: \['ba'\]"):
                engine.add_request(PROMPTS[0], "ffba")
            with pytest.raises(ValueError, match="was unloaded and still has requests running"):
                engine.load_adapter(saved / "ffba", "ffba")
            engine.load_adapter(saved / "ba", "ba2")
        assert engine.wait(engine.add_request(PROMPTS[0], "ba2", max_new_tokens=4)).generated_tokens == \
            _alone(saved, "ba", PROMPTS[0], 4)
        assert engine.wait(running).generated_tokens == _alone(saved, "ffba", PROMPTS[3], 40)
        engine.load_adapter(saved / "ffba", "ffba")  # its old rows were freed: the name is free again
        assert engine.adapters() == ["ba", "ba2", "ffba"]
        with pytest.raises(KeyError, match="no adapter named 'nope' is loaded"):
            engine.unload_adapter("nope")


def test_bad_requests_are_refused_with_what_to_change(saved):
    with pytest.raises(TypeError, match="SlotEngine serves a FusedModel, got a LlamaForCausalLM"):
        SlotEngine(_llama())
    with pytest.raises(ValueError, match="slots must be an integer >= 1, got 0"):
        SlotEngine(_bank(saved), slots=0)
    elsewhere = _bank(saved)
    elsewhere.model.to("meta")
    with pytest.raises(ValueError, match=r"SlotEngine runs on the CPU; this model is on meta: move it with model.to\('cpu'\)"):
        SlotEngine(elsewhere)
    engine = SlotEngine(_bank(saved), slots=1, max_len=16)
    with pytest.raises(RuntimeError, match=r"the engine does not accept requests \(stopped\)"):
        engine.add_request([1, 2])
    with engine:
        with pytest.raises(ValueError, match=r"the prompt \(12 tokens\) and max_new_tokens \(8\) take 20 positions; "
                                             r"a slot holds 16 \(--max-model-len\)"):
            engine.add_request(list(range(3, 15)), max_new_tokens=8)
        with pytest.raises(ValueError, match=r"no adapter named 'nope' is loaded; loaded adapters: \['ffba', 'ba'\]"):
            engine.add_request([1, 2], "nope")
        room = engine.add_request(list(range(3, 15)), ignore_eos=True)  # max_new_tokens: the slot's room left
        assert len(engine.wait(room).generated_tokens) == 4
        with pytest.raises(ValueError, match="the prompt is empty"):
            engine.add_request([])
    assert engine.model.config._attn_implementation != "fflora_slots"  # the model's own attention is back


def test_run_serves_in_the_calling_thread_until_told(saved):
    """`fflora serve`'s form: the loop in the thread that built the model, requests from others."""
    engine = SlotEngine(_bank(saved), slots=2, max_len=64, eos_token_id=[])
    answers, done = [], threading.Event()

    def client():
        answers.append(engine.wait(engine.add_request(PROMPTS[0], "ba", 4)).generated_tokens)
        done.set()

    engine.run(until=done.is_set, started=threading.Thread(target=client).start)
    assert answers == [_alone(saved, "ba", PROMPTS[0], 4)] and not engine.is_running()
    assert engine.model.config._attn_implementation != "fflora_slots"
    threading.Timer(0.5, engine.stop).start()  # stopped from another thread: run returns
    engine.run(until=lambda: False)
    assert not engine.is_running()
    with pytest.raises(RuntimeError, match=r"the engine does not accept requests \(stopped\)"):
        engine.add_request([1, 2])


def test_the_engine_plans_the_gemms_for_its_batch_sizes_unless_planned(saved):
    with pytest.raises(ValueError, match=r"gemm_plan must be one of \['standard', 'transposed', 'packed', 'auto'\], got 'fast'"):
        SlotEngine(_bank(saved), gemm_plan="fast")
    fused = _bank(saved)
    with SlotEngine(fused, slots=4, max_len=64, eos_token_id=[]) as engine:
        assert fused.gemm_mode == "auto" and fused.planned
        measured = {tuple(rows for rows, _ in g.storage.gemm_plan.orders) for g in fused.gemms}
        assert measured == {(1, 4)}  # every GEMM: an operand order for one row and for the 4 slots
        assert engine.wait(engine.add_request(PROMPTS[0], "ffba", 5)).generated_tokens == _alone(saved, "ffba", PROMPTS[0], 5)
    planned = _bank(saved)
    planned.plan("transposed")
    with SlotEngine(planned, slots=4, max_len=64):
        assert planned.gemm_mode == "transposed"  # the caller's plan is kept
    with SlotEngine(unplanned := _bank(saved), slots=2, max_len=64, gemm_plan="standard"):
        assert unplanned.gemm_mode == "standard" and not unplanned.planned


@pytest.mark.slow
def test_compiled_decode_steps_give_each_request_its_adapters_tokens(saved):
    """Decode steps compiled at start, one graph for 3, 2 and 1 rows (padded to 2 by a row in the scratch slot),
    prompts eager in chunks: the same tokens as each request alone, and nothing compiled after start."""
    adapters = ["ffba", BASE_NAME, "ba"]
    before = counters["stats"]["unique_graphs"]
    with SlotEngine(_bank(saved), slots=3, max_len=64, max_batch_tokens=3, eos_token_id=[], compile=True) as engine:
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == before + 1  # one graph for every number of rows
        measured = {tuple(rows for rows, _ in g.storage.gemm_plan.orders) for g in engine.fused.gemms}
        assert measured == {(3,)}  # one operand order per GEMM, the full batch's: the graph compares no row count
        ids = [engine.add_request(p, a, max_new_tokens=6) for p, a in zip(PROMPTS, adapters)]
        outputs = [engine.wait(i).generated_tokens for i in ids]
        assert engine.bank.step.fixed  # compiled over the bank's whole room
        assert counters["stats"]["unique_graphs"] == graphs  # every bucket's graph was compiled by the warm-up
    for tokens, prompt, adapter in zip(outputs, PROMPTS, adapters):
        assert tokens == _alone(saved, adapter, prompt, 6), adapter
