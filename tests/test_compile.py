"""The compiled decode step: the fused form traces as one graph, and compiled decoding gives the
eager tokens, follows adapters loaded afterwards, and is undone by unfuse."""

import pytest
import torch
from conftest import FAMILIES, make_model, randomize_adapters

import fflora
import fflora.fastpath.plan
from fflora.fastpath.compile import compile_generation, decode_step, is_compiled


@pytest.fixture
def fresh_dynamo():
    """Each compiling test starts and ends with Dynamo's caches empty (graphs of other tests' models
    would count towards its recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _fused(arch, family=None, seed=1):
    model = make_model(arch)
    if family is not None:
        fflora.apply_adapter(model, FAMILIES[family]())
        randomize_adapters(model, seed=seed)
    return fflora.fuse(model)


@pytest.mark.parametrize("family", [None, *FAMILIES])
def test_the_fused_form_traces_as_one_graph(arch, family, fresh_dynamo):
    if family == "zflora" and arch == "gemma3_text":
        pytest.skip("zFLoRA refuses Gemma 3")
    model = _fused(arch, family)
    ids = torch.randint(3, 128, (2, 7))
    explained = torch._dynamo.explain(model)(input_ids=ids, use_cache=False)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_a_projection_called_outside_its_decoder_layer_is_refused():
    model = fflora.apply_adapter(make_model("llama"), FAMILIES["ffba"]())
    x = torch.randn(1, 3, model.config.hidden_size)
    with pytest.raises(RuntimeError, match="an FFBA projection was called outside its decoder layer"):
        model.model.layers[1].self_attn.q_proj(x)  # training form
    fflora.fuse(model)
    with pytest.raises(RuntimeError, match="an FFBA projection was called outside its model's forward pass"):
        model.model.layers[1].self_attn.q_proj(x)


def test_fusing_turns_the_embedding_grad_hook_off_and_unfusing_back_on():
    model = fflora.apply_adapter(make_model("llama"), FAMILIES["ffba"]())
    ids = torch.randint(3, 128, (1, 5))
    embed = model.get_input_embeddings()
    assert embed(ids).requires_grad  # reentrant gradient checkpointing needs it while training
    fflora.fuse(model)
    assert not embed(ids).requires_grad
    fflora.unfuse(model)
    assert embed(ids).requires_grad


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_decoding_gives_the_eager_tokens_and_unfuse_undoes_it(family, fresh_dynamo):
    model = _fused("llama", family).eval()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    eager = model.generate(ids, max_new_tokens=6, do_sample=False)
    torch.manual_seed(3)
    eager_sampled = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20)

    assert fflora.compile_decode(model) is model
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), eager)
    assert callable(model.__dict__["_compiled_call"])  # generate went through the compiled step
    torch.manual_seed(3)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20), eager_sampled)

    fflora.unfuse(model)
    config = model.generation_config
    assert (config.cache_implementation, config.compile_config) == (None, None)
    assert "_compiled_call" not in model.__dict__ and not is_compiled(model)


@pytest.mark.parametrize("freezing, plan", [(False, None), (True, None), (False, "packed")])
def test_a_compiled_model_follows_an_adapter_loaded_after_compiling(tmp_path, freezing, plan, fresh_dynamo):
    """Packed: the graph runs oneDNN's copies by handle; the load packs them again under the same handles."""
    other = fflora.apply_adapter(make_model("llama"), FAMILIES["ffba"]())
    randomize_adapters(other, seed=9)
    fflora.save_adapter(other, tmp_path / "other")
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    expected = fflora.fuse(other).generate(ids, max_new_tokens=6, do_sample=False)

    model = _fused("llama", "ffba", seed=1)
    if plan is not None:
        fflora.plan_gemms(model, plan)
    model = fflora.compile_decode(model, freezing=freezing)
    before = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert not torch.equal(before, expected)  # the two adapters decode differently
    fflora.load_adapter(model, tmp_path / "other")
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)


def test_planning_after_compiling_drops_the_compiled_step(monkeypatch, fresh_dynamo):
    import fflora.fastpath.plan

    monkeypatch.setattr(fflora.fastpath.plan, "MAX_COPIES", 4)
    model = fflora.compile_decode(_fused("llama", "ffba"))
    step = decode_step(model)
    fflora.plan_gemms(model, "transposed")
    assert "_compiled_call" not in model.__dict__ and decode_step(model) is not step


def test_models_that_cannot_be_compiled_are_refused():
    with pytest.raises(ValueError, match=r"compile_decode needs a fused model: call fflora.fuse\(model\) first"):
        fflora.compile_decode(fflora.apply_adapter(make_model("llama"), FAMILIES["ffba"]()))
    with pytest.raises(ValueError, match=r"no compiled decode step; call fflora.compile_decode\(model\)"):
        decode_step(fflora.fuse(make_model("llama")))


@pytest.mark.parametrize("peer", ["stock", "lora"])
def test_compile_generation_compiles_the_peers_to_their_eager_tokens(peer, fresh_dynamo):
    """The bench's compiled peers (stock transformers, PEFT LoRA unmerged) decode what they decode eagerly."""
    from peft import LoraConfig, get_peft_model

    model = make_model("llama")
    if peer == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        randomize_adapters(model, seed=2)
        model = model.get_base_model()  # the transformers model, LoRA layers inside: what generate compiles
    model.eval()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    eager = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert not is_compiled(model)
    assert compile_generation(model) is model and is_compiled(model)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), eager)
    assert decode_step(model) is model.__dict__["_compiled_call"]  # generate went through the compiled step


@pytest.mark.parametrize("weights", [None, "int8"])
def test_a_compiled_bank_decodes_each_row_as_its_adapter_alone_in_one_graph(tmp_path, weights, fresh_dynamo):
    """Fixed windows and per-row masks: every mix of adapters runs the same compiled graph."""
    if weights == "int8" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("int8 weights need PyTorch's AVX-512 kernel")
    configs = {"a": FAMILIES["ffba"](), "b": fflora.FFBAConfig(r=8, alpha=16, phi="silu"),
               "c": fflora.FFBAConfig(r=4, alpha=8, forward=False)}
    for seed, (name, config) in enumerate(configs.items(), start=1):
        model = fflora.apply_adapter(make_model("llama"), config)
        randomize_adapters(model, seed=seed)
        fflora.save_adapter(model, tmp_path / name)
    bank = fflora.fuse(make_model("llama"), max_adapters=4, weights=weights).eval()
    for name in configs:
        fflora.load_adapter(bank, tmp_path / name, adapter_name=name)
    ids = torch.randint(3, 128, (4, 7), generator=torch.Generator().manual_seed(0))
    mixes = [["a", fflora.BASE_NAME, "b", "a"], ["c", "b", "c", fflora.BASE_NAME]]
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    eager = [bank.generate(ids, adapter_names=names, **greedy) for names in mixes]

    assert fflora.compile_decode(bank) is bank
    assert torch.equal(bank.generate(ids, adapter_names=mixes[0], **greedy), eager[0])
    assert callable(bank.__dict__["_compiled_call"])  # generate went through the compiled step
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(bank.generate(ids, adapter_names=mixes[1], **greedy), eager[1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # another mix, no new graph
    for row, name in enumerate(mixes[1]):
        alone = make_model("llama")
        if name != fflora.BASE_NAME:
            fflora.load_adapter(alone, tmp_path / name)
        expected = fflora.fuse(alone, weights=weights).generate(ids[row : row + 1], **greedy)
        assert torch.equal(eager[1][row], expected[0]), name


def test_the_cpp_wrapper_decodes_the_eager_tokens(fresh_dynamo):
    model = _fused("llama", "ffba").eval()
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    eager = model.generate(ids, max_new_tokens=4, do_sample=False)
    fflora.compile_decode(model, cpp_wrapper=True)
    assert model.generation_config.compile_config.options == {"cpp_wrapper": True}
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), eager)
    assert callable(model.__dict__["_compiled_call"])  # generate went through the compiled step
