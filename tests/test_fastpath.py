"""The decode fast path: GEMM plans change how the weights lie and which kernel reads them, never
what the model computes."""

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, make_model, randomize_adapters

import fflora
import fflora.fastpath.plan
from fflora.fastpath.plan import PlannedLinear, candidates, choose_plan, planned_modules
from fflora.methods import FusedModel, plan_gemms
from fflora.ops.gemm import GemmPlan, laid_out, layout_of, packable, planned_linear

TOL = 1e-4


@pytest.fixture(autouse=True)
def quick_measurements(monkeypatch):
    """The tiny models' weights fit in cache anyway: a few copies keep "auto" fast."""
    monkeypatch.setattr(fflora.fastpath.plan, "MAX_COPIES", 4)


def _ids(batch=3, length=10):
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding
    return ids, mask


@pytest.mark.parametrize("layout", ["standard", "transposed"])
@pytest.mark.parametrize("order", ["xw", "wx"])
@pytest.mark.parametrize("bias", [False, True])
def test_planned_linear_is_f_linear(layout, order, bias):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 16, generator=gen)
    b = torch.randn(24, generator=gen) if bias else None
    for shape in ((1, 16), (3, 1, 16), (2, 5, 16)):
        x = torch.randn(*shape, generator=gen)
        plan = GemmPlan(layout, ((1, order), (3, order), (10, order)))
        out = planned_linear(x, laid_out(weight, layout), b, plan)
        assert out.shape == (*shape[:-1], 24) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_a_plan_picks_the_nearest_measured_row_count_and_leaves_prefill_to_f_linear():
    plan = GemmPlan("standard", ((1, "xw"), (8, "wx")))
    assert [plan.order(m) for m in (1, 2, 5, 8, 16, 17, 128)] == ["xw", "xw", "wx", "wx", "wx", "xw", "xw"]
    assert GemmPlan("transposed").order(1) == "xw"


def test_the_chosen_layout_has_the_least_total_time_and_each_row_count_its_faster_order():
    times = {"standard/xw/1": 5, "standard/wx/1": 6, "standard/xw/8": 9, "standard/wx/8": 4,
             "transposed/xw/1": 3, "transposed/wx/1": 3.5, "transposed/xw/8": 12, "transposed/wx/8": 20}
    assert choose_plan(times, (1, 8)) == GemmPlan("standard", ((1, "xw"), (8, "wx")))  # 9 < 15
    assert choose_plan(times, (1,)) == GemmPlan("transposed", ((1, "xw"),))


def _storages(model):
    return [g.storage for g in FusedModel.of(model).gemms]


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied LM head and embeddings; biases on q/k/v
@pytest.mark.parametrize("family", [None, "ffba", "zflora"])
@pytest.mark.parametrize("mode", ["transposed", "packed", "auto", "forced wx"])
def test_every_plan_keeps_the_fused_model_equal_to_the_training_form(arch, family, mode):
    model = make_model(arch)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    if family:
        fflora.apply_adapter(model, FAMILIES[family]())
        randomize_adapters(model)
    ids, mask = _ids()
    reference = model(ids, attention_mask=mask).logits
    gen_reference = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fflora.fuse(model)
    if mode == "forced wx":  # both layouts, the swapped operand order at every decode row count
        report = plan_gemms(model, "transposed")
        for i, module in enumerate(planned_modules(model, _storages(model))):
            module.gemm_plan = GemmPlan(layout_of(module.weight), ((1, "wx"), (3, "wx"), (30, "wx")))
            if i % 2:
                module.weight = laid_out(module.weight, "standard") if module is not model.lm_head else module.weight
    else:
        report = plan_gemms(model, mode, rows=(1, 3))
        shapes = {f"{m.weight.shape[0]}x{m.weight.shape[1]} float32" for m in planned_modules(model, _storages(model))}
        assert set(report["plans"]) == shapes
        if mode == "auto":
            pairs = 2 * len(candidates(torch.float32))  # 2 row counts
            assert set(report["measured"]) == shapes and all(len(t) == pairs for t in report["measured"].values())
        elif mode == "packed":  # row-major weights, a oneDNN copy beside each
            modules = planned_modules(model, _storages(model))
            assert all(layout_of(m.weight) == "standard" and m.packed_handle is not None for m in modules)
            assert report["packed_bytes"] == sum(4 * m.weight.numel() for m in modules)
        else:
            assert all(layout_of(m.weight) == "transposed" for m in planned_modules(model, _storages(model)))
    assert type(model.lm_head) is PlannedLinear and (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert (model(ids, attention_mask=mask).logits - reference)[mask.bool()].abs().max().item() < TOL
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0),
                       gen_reference)
    fflora.unfuse(model)  # the training form again: the same values, row-major, a plain LM head
    assert type(model.lm_head) is torch.nn.Linear and not hasattr(model.lm_head, "gemm_plan")
    assert not any("packed_handle" in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, state[k]) and v.is_contiguous() for k, v in model.state_dict().items())


@torch.no_grad()
def test_adapters_load_into_a_planned_fused_model_and_bank(tmp_path):
    trained = fflora.apply_adapter(make_model("llama"), fflora.FFBAConfig(r=4, alpha=8))
    randomize_adapters(trained)
    fflora.save_adapter(trained, tmp_path / "a")
    ids, mask = _ids()
    expected = trained(ids, attention_mask=mask).logits
    single = fflora.fuse(fflora.apply_adapter(make_model("llama"), fflora.FFBAConfig(r=4, alpha=8)))
    plan_gemms(single, "transposed")
    fflora.load_adapter(single, tmp_path / "a")  # rewrites the adapter rows/columns in place
    assert (single(ids, attention_mask=mask).logits - expected)[mask.bool()].abs().max().item() < TOL
    for mode in ("transposed", "packed"):  # packed: windows run as the whole matrix, loads pack again
        bank = fflora.fuse(make_model("llama"), max_adapters=2)
        plan_gemms(bank, mode)
        if mode == "transposed":
            for module in planned_modules(bank, _storages(bank)):
                module.gemm_plan = GemmPlan("transposed", ((3, "wx"),))
        bank(ids, attention_mask=mask)  # packed before the load: the load's writes make the copies stale
        fflora.load_adapter(bank, tmp_path / "a", adapter_name="a")
        rows = bank(ids, attention_mask=mask, adapter_names=["a", "__base__", "a"]).logits
        assert (rows[0] - expected[0])[mask[0].bool()].abs().max().item() < TOL, mode
        assert (rows[1] - make_model("llama")(ids, attention_mask=mask).logits[1]).abs().max().item() < TOL, mode


def test_bad_plans_and_unfused_models_are_refused():
    with pytest.raises(ValueError, match="call fflora.fuse"):
        plan_gemms(make_model("llama"), "transposed")
    fused = fflora.fuse(make_model("llama"))
    with pytest.raises(ValueError, match=r"gemm plan must be one of \['standard', 'transposed', 'packed', 'auto'\], got 'columns'"):
        plan_gemms(fused, "columns")
    with pytest.raises(ValueError, match=r"rows must be integers >= 1 \(the decode batch sizes to tune for\), got \[0\]"):
        plan_gemms(fused, "auto", rows=(0,))



@torch.no_grad()
def test_a_deep_copy_of_a_packed_model_keeps_copies_of_its_own(tmp_path):
    """A deep copy holds its own handles: an adapter loaded into the copy repacks only the copy's GEMMs, and
    the original runs on after the copy is gone."""
    trained = fflora.apply_adapter(make_model("llama"), fflora.FFBAConfig(r=4, alpha=8))
    randomize_adapters(trained)
    fflora.save_adapter(trained, tmp_path / "a")
    ids, mask = _ids()
    bank = fflora.fuse(make_model("llama"), max_adapters=2)
    plan_gemms(bank, "packed")
    before = bank(ids, attention_mask=mask).logits
    twin = copy.deepcopy(bank)
    handles = lambda model: {m.packed_handle for m in planned_modules(model, _storages(model))}  # noqa: E731
    assert not handles(bank) & handles(twin) and len(handles(twin)) == len(planned_modules(twin, _storages(twin)))
    fflora.load_adapter(twin, tmp_path / "a", adapter_name="a")
    rows = twin(ids, attention_mask=mask, adapter_names=["a"] * 3).logits
    assert (rows - trained(ids, attention_mask=mask).logits)[mask.bool()].abs().max().item() < TOL
    del twin, rows
    gc.collect()
    assert torch.equal(bank(ids, attention_mask=mask).logits, before)


def test_the_packed_layout_is_for_cpu_weights_of_float32_or_bfloat16():
    assert packable(torch.float32) and packable(torch.bfloat16, "cpu")
    assert not packable(torch.float16) and not packable(torch.float32, "cuda") and not packable(torch.float32, "meta")
    fused = fflora.fuse(make_model("llama").to(torch.float16))
    with pytest.raises(ValueError, match=r"the packed layout runs float32 and bfloat16 weights on a CPU where PyTorch "
                                         r"has oneDNN; these are torch.float16 on cpu: plan 'auto' or 'standard'"):
        plan_gemms(fused, "packed")
