"""`FusedModel`: the one inference form, built once; the functional API is its methods by another name."""

import pytest
import torch
from conftest import make_model, randomize_adapters

import fflora
import fflora.methods
from fflora import BASE_NAME, FusedModel

TOL = 1e-4


def _ids():
    return torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [3, 4, 5, 6, 7]])


def _saved(tmp_path, name, config, seed):
    trained = fflora.apply_adapter(make_model("llama"), config)
    randomize_adapters(trained, seed=seed)
    fflora.save_adapter(trained, tmp_path / name)
    return trained


@torch.no_grad()
def test_a_bank_built_once_serves_each_row_its_adapter_and_unfuses_exactly(tmp_path):
    trained = {"a": _saved(tmp_path, "a", fflora.FFBAConfig(r=4, alpha=8), seed=1),
               "b": _saved(tmp_path, "b", fflora.FFBAConfig(r=8, forward=False), seed=2)}
    base = make_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    fused = FusedModel.build(base, max_adapters=2)
    assert FusedModel.of(base) is fused and fused.model is base and fused.names() == []
    fused.load("a", tmp_path / "a")
    fused.load("b", tmp_path / "b")
    assert fused.names() == ["a", "b"] and fflora.list_adapters(base) == ["a", "b"]
    ids = _ids()
    rows = fused(ids, adapter_names=["a", BASE_NAME, "b"]).logits
    assert (rows[0] - trained["a"](ids).logits[0]).abs().max().item() < TOL
    assert (rows[1] - make_model("llama")(ids).logits[1]).abs().max().item() < TOL
    assert (rows[2] - trained["b"](ids).logits[2]).abs().max().item() < TOL
    generated = fused.generate(ids[:1], adapter_names=["b"], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, trained["b"].generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0))
    fused.unload("a")
    assert fused.names() == ["b"]
    with pytest.raises(ValueError, match=r"no adapter named 'a' is loaded; loaded adapters: \['b'\]"):
        fused(ids, adapter_names=["a", "b", "b"])
    assert fused.unfuse() is base and FusedModel.of(base) is None and fused.names() == []
    assert fused.unfuse() is base  # nothing fused any more: nothing to undo
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_building_again_returns_the_same_object_or_names_the_fix():
    model = make_model("llama")
    fused = FusedModel.build(model, max_adapters=2, rank_budget=16)
    assert FusedModel.build(model) is fused and FusedModel.build(model, max_adapters=2) is fused
    assert fflora.fuse(model, max_adapters=2, rank_budget=16) is model
    with pytest.raises(ValueError, match=r"already has an adapter bank \(2 adapters, rank budget 16\); unfuse it first"):
        FusedModel.build(model, max_adapters=3)
    with pytest.raises(ValueError, match="fused with float32 weights; call fflora.unfuse"):
        FusedModel.build(model, weights="int8")
    single = FusedModel.build(make_model("llama"))
    with pytest.raises(ValueError, match="fused with a single adapter; call fflora.unfuse"):
        FusedModel.build(single.model, max_adapters=2)
    with pytest.raises(ValueError, match=r"has no adapter bank; create one with fflora.fuse\(model, max_adapters=K\)"):
        single.load("a", "anywhere")
    with pytest.raises(ValueError, match="max_adapters must be an integer >= 1, got 0"):
        FusedModel.build(make_model("llama"), max_adapters=0)
    with pytest.raises(ValueError, match="takes a single fused adapter's modules out; this model has an adapter bank"):
        fused.drop_training_form()
    with pytest.raises(ValueError, match="takes a single fused adapter's modules out; this model has no adapter"):
        single.drop_training_form()


@torch.no_grad()
def test_a_single_adapter_fuses_in_and_its_plan_and_compile_settings_are_undone_on_unfuse():
    model = fflora.apply_adapter(make_model("llama"), fflora.FFBAConfig(r=4, alpha=8))
    randomize_adapters(model)
    ids = _ids()
    reference = model(ids).logits
    config = model.generation_config
    settings = (config.cache_implementation, config.compile_config)
    fused = FusedModel.build(model)
    assert fused.method.name == "ffba" and fused.bank is None and "FFBA" in repr(fused)
    report = fused.plan("transposed")
    assert fused.gemm_mode == "transposed" and fused.planned and set(report["plans"])
    assert fused.compile() is fused and fused.compiled == settings and config.cache_implementation == "static"
    assert (fused(ids).logits - reference).abs().max().item() < TOL
    with pytest.raises(ValueError, match="has no adapter bank"):
        fused(ids, adapter_names=["a", "a", "a"])
    fflora.unfuse(model)  # the functional form: the same object's unfuse
    assert (config.cache_implementation, config.compile_config) == settings and fused.planned == []
    assert type(model.lm_head) is torch.nn.Linear and not hasattr(model.lm_head, "gemm_plan")
    assert (model(ids).logits - reference).abs().max().item() == 0


def test_the_functional_api_needs_a_fused_model():
    with pytest.raises(ValueError, match=r"GEMM plans are part of the fused form; call fflora.fuse\(model\) first"):
        fflora.plan_gemms(make_model("llama"))
    with pytest.raises(ValueError, match=r"compile_decode needs a fused model: call fflora.fuse\(model\) first"):
        fflora.compile_decode(make_model("llama"))
    model = make_model("llama")
    assert fflora.unfuse(model) is model and FusedModel.of(model) is None


@torch.no_grad()
def test_ffbas_single_adapter_is_a_one_adapter_bank_sized_to_its_ranks(tmp_path):
    """FA rank 4 and BA rank 12: the GEMMs widen by 8 and 16 (aligned), no more; no mask runs; the
    adapter's parameters stay the model's (refresh rewrites them) and unfusing gives the training form."""
    trained = _saved(tmp_path, "a", fflora.FFBAConfig(r=4, r_backward=12, alpha=8), seed=1)
    expected = trained(_ids()).logits
    fused = FusedModel.build(trained)
    assert fused.bank is None and fused.fused_form.names() == ["default"]  # no bank to load into
    assert fused.fused_form.room == {"fa.attn": 8, "fa.mlp": 8, "ba.attn": 16, "ba.mlp": 16}
    first = trained.model.layers[1].self_attn
    d, q_kv = trained.config.hidden_size, first.ffba_fused_inputs.base_rows
    assert (first.ffba_fused_inputs.n_rows, first.ffba_fused_inputs.n_cols) == (q_kv + 8, d + 16)
    assert (first.o_proj.n_rows, first.o_proj.n_cols) == (d + 16, first.o_proj.d_core + 8)
    held = fused.fused_form.step.selection
    assert fused.fused_form.step.fixed and all(mask is None for mask in held.masks.values())
    assert (fused(_ids()).logits - expected).abs().max().item() < TOL
    with pytest.raises(ValueError, match="has no adapter bank"):
        fused.load("b", tmp_path / "a")
    for param in fflora.methods.adapter_parameters(trained).values():
        param.mul_(0.5)
    fused.refresh()
    halved = fused(_ids()).logits
    model = fused.unfuse()
    assert model is trained and (model(_ids()).logits - halved).abs().max().item() < TOL
    assert (halved - expected).abs().max().item() > 1e-3
