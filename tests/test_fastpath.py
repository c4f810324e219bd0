"""The decode fast path: GEMM layouts change where the weights lie, never what the model computes."""

import pytest
import torch
from conftest import FAMILIES, make_model, randomize_adapters

import fflora
from fflora.fastpath import fused_gemms, layout_of, set_gemm_layout

TOL = 1e-4


def _ids(batch=3, length=10):
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding
    return ids, mask


@torch.no_grad()
@pytest.mark.parametrize("family", [None, "ffba", "zflora"])
@pytest.mark.parametrize("layout", ["transposed", "auto"])
def test_every_layout_keeps_the_fused_model_equal_to_the_training_form(family, layout):
    model = make_model("qwen2")  # biases on q/k/v
    if family:
        fflora.apply_adapter(model, FAMILIES[family]())
        randomize_adapters(model)
    ids, mask = _ids()
    reference = model(ids, attention_mask=mask).logits
    gen_reference = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fflora.fuse(model)
    report = set_gemm_layout(model, layout)
    shapes = {f"{m.weight.shape[0]}x{m.weight.shape[1]}" for m in fused_gemms(model)}
    assert set(report["layouts"]) == shapes
    if layout == "auto":
        assert set(report["measured"]) == shapes and all(set(t) == {"standard", "transposed"} for t in report["measured"].values())
    else:
        assert all(layout_of(m.weight) == "transposed" for m in fused_gemms(model))
    assert (model(ids, attention_mask=mask).logits - reference)[mask.bool()].abs().max().item() < TOL
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0),
                       gen_reference)
    fflora.unfuse(model)  # the training form again: the same values, row-major as nn.Linear keeps them
    assert all(torch.equal(v, state[k]) and v.is_contiguous() for k, v in model.state_dict().items())


@torch.no_grad()
def test_adapters_load_into_a_transposed_fused_model_and_bank(tmp_path):
    trained = fflora.apply_adapter(make_model("llama"), fflora.FFBAConfig(r=4, alpha=8))
    randomize_adapters(trained)
    fflora.save_adapter(trained, tmp_path / "a")
    ids, mask = _ids()
    expected = trained(ids, attention_mask=mask).logits
    single = fflora.fuse(fflora.apply_adapter(make_model("llama"), fflora.FFBAConfig(r=4, alpha=8)))
    set_gemm_layout(single, "transposed")
    fflora.load_adapter(single, tmp_path / "a")  # rewrites the adapter rows/columns in place
    assert (single(ids, attention_mask=mask).logits - expected)[mask.bool()].abs().max().item() < TOL
    bank = fflora.fuse(make_model("llama"), max_adapters=2)
    set_gemm_layout(bank, "transposed")
    fflora.load_adapter(bank, tmp_path / "a", adapter_name="a")
    rows = bank(ids, attention_mask=mask, adapter_names=["a", "__base__", "a"]).logits
    assert (rows[0] - expected[0])[mask[0].bool()].abs().max().item() < TOL
    assert (rows[1] - make_model("llama")(ids, attention_mask=mask).logits[1]).abs().max().item() < TOL


def test_bad_layouts_and_unfused_models_are_refused():
    with pytest.raises(ValueError, match="call fflora.fuse"):
        set_gemm_layout(make_model("llama"), "transposed")
    with pytest.raises(ValueError, match=r"gemm layout must be one of \['standard', 'transposed', 'auto'\], got 'columns'"):
        set_gemm_layout(fflora.fuse(make_model("llama")), "columns")
