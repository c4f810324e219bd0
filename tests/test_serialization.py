import json
import warnings

import pytest
import torch
from conftest import make_model, randomize_adapters

import fflora
from fflora.methods.serialization import CONFIG_NAME, WEIGHTS_NAME


def _ids():
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _trained(arch, tmp_path, **kwargs):
    model = make_model(arch)
    fflora.apply_ffba(model, fflora.FFBAConfig(r=4, alpha=8, **kwargs))
    randomize_adapters(model)
    fflora.save_adapter(model, tmp_path)
    return model


@torch.no_grad()
def test_save_load_into_fresh_base_reproduces_logits(arch, tmp_path):
    model = _trained(arch, tmp_path, phi="relu", r_backward=2)
    expected = model(_ids()).logits
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    fresh = fflora.load_adapter(make_model(arch), tmp_path)
    assert fresh.ffba_config.same_adapter(model.ffba_config)
    assert torch.equal(fresh(_ids()).logits, expected)


@torch.no_grad()
def test_swapping_adapters_in_a_fused_model_rewrites_only_adapter_weights(tmp_path):
    first = _trained("qwen2", tmp_path / "a")
    model = make_model("qwen2")
    fflora.apply_ffba(model, fflora.FFBAConfig(r=4, alpha=8))
    fflora.fuse(model)
    group = model.model.layers[0].self_attn.ffba_fused_inputs
    storage, base_block = group.storage.weight.data_ptr(), group.storage.weight[: sum(group.widths), : group.d_in].clone()
    fflora.load_adapter(model, tmp_path / "a")
    assert group.storage.weight.data_ptr() == storage
    assert torch.equal(group.storage.weight[: sum(group.widths), : group.d_in], base_block)
    assert (model(_ids()).logits - first(_ids()).logits).abs().max().item() < 1e-4


def test_loading_onto_other_dimensions_or_architecture_fails(tmp_path):
    _trained("llama", tmp_path)
    wider = make_model("llama")
    wider.config.hidden_size = 64  # what the saved config is compared with
    with pytest.raises(ValueError, match=r"saved for another base model.*hidden_size: adapter 32, model 64"):
        fflora.load_adapter(wider, tmp_path)
    with pytest.raises(ValueError, match=r"saved for another base model.*model_type: adapter 'llama', model 'qwen2'"):
        fflora.load_adapter(make_model("qwen2"), tmp_path)


def test_base_with_other_weights_warns_or_fails_when_strict(tmp_path):
    _trained("llama", tmp_path)
    other = make_model("llama", seed=123)  # same shape, other weights
    with pytest.raises(ValueError, match=r"a base model with other weights than this one.*strict=True"):
        fflora.load_adapter(other, tmp_path, strict=True)
    assert not hasattr(other.model.layers[0], "ffba")  # strict failure leaves the model untouched
    with pytest.warns(fflora.BaseModelMismatchWarning, match="other weights"):
        fflora.load_adapter(other, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fflora.load_adapter(make_model("llama"), tmp_path, strict=True)  # the right base: silent


def test_mismatch_messages_name_what_differs(tmp_path):
    """No "(None)" for an unnamed base, and no "other weights ('X') than this one ('X')"."""
    _trained("llama", tmp_path / "unnamed")
    other = make_model("llama", seed=123)
    with pytest.raises(fflora.BaseModelMismatchError) as unnamed:
        fflora.load_adapter(other, tmp_path / "unnamed", strict=True)
    assert "trained on a base model with other weights than this one; its outputs" in str(unnamed.value)
    named = make_model("llama")
    named.config._name_or_path = "org/base"
    fflora.apply_ffba(named, fflora.FFBAConfig(r=4))
    fflora.save_adapter(named, tmp_path / "named")
    other.config._name_or_path = "org/base"
    with pytest.raises(ValueError, match=r"trained on other weights of 'org/base' than this model's \(same name"):
        fflora.load_adapter(other, tmp_path / "named", strict=True)
    other.config._name_or_path = "org/other"
    with pytest.raises(ValueError, match=r"trained on 'org/base', a base model with other weights than this one "
                                         r"\('org/other'\)"):
        fflora.load_adapter(other, tmp_path / "named", strict=True)
    wider = make_model("llama")
    wider.config.hidden_size = 64
    with pytest.raises(ValueError, match=r"saved for another base model, 'org/base': its shape differs from this "
                                         r"model's \(hidden_size: adapter 32, model 64\)\. Load it onto the model it "
                                         r"was trained on \(--model org/base\)"):
        fflora.load_adapter(wider, tmp_path / "named")
    with pytest.raises(ValueError, match=r"saved for another base model \(its name was not recorded\): its shape"):
        fflora.load_adapter(wider, tmp_path / "unnamed")


def test_fingerprint_is_the_same_in_every_form(tmp_path):
    from fflora.methods.fingerprint import base_model_fingerprint

    model = make_model("gemma3_text")
    plain = base_model_fingerprint(model)
    fflora.apply_ffba(model, fflora.FFBAConfig(r=2))
    assert base_model_fingerprint(model) == plain
    fflora.fuse(model)
    assert base_model_fingerprint(model) == plain
    assert base_model_fingerprint(make_model("gemma3_text").to(torch.bfloat16)) == plain


def test_truncated_or_corrupt_files_fail_clearly(tmp_path):
    _trained("llama", tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is truncated or corrupt"):
        fflora.load_adapter(make_model("llama"), tmp_path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        fflora.load_adapter(make_model("llama"), tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"peft_type": "FFBA", "r": ')
    with pytest.raises(ValueError, match=r"adapter_config\.json is corrupt \(not valid JSON"):
        fflora.load_adapter(make_model("llama"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no fflora adapter at"):
        fflora.load_adapter(make_model("llama"), tmp_path / "missing")


def test_weights_that_do_not_match_their_config_fail_and_leave_the_model_clean(tmp_path):
    _trained("llama", tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["r"] = 2  # the file says rank 2, the tensors are rank 4
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    model = make_model("llama")
    with pytest.raises(ValueError, match="wrong shapes"):
        fflora.load_adapter(model, tmp_path)
    assert not hasattr(model.model.layers[0], "ffba")


def test_loading_an_adapter_of_another_config_onto_an_adapted_model_fails(tmp_path):
    _trained("llama", tmp_path)
    model = fflora.apply_ffba(make_model("llama"), fflora.FFBAConfig(r=2))
    with pytest.raises(ValueError, match="another configuration"):
        fflora.load_adapter(model, tmp_path)


def test_saving_without_adapter_fails(tmp_path):
    with pytest.raises(ValueError, match="no adapter to save"):
        fflora.save_adapter(make_model("llama"), tmp_path)


def test_loading_weights_into_a_model_without_an_adapter_says_what_to_do_instead():
    from fflora.methods import load_adapter_state

    with pytest.raises(ValueError, match=r"carries no adapter to load weights into; use fflora.load_adapter"):
        load_adapter_state(make_model("llama"), {})


@torch.no_grad()
def test_a_run_folder_loads_as_its_adapter(tmp_path):
    """The run folder `fflora train` writes holds the adapter in adapter/: load_adapter takes either."""
    trained = _trained("llama", tmp_path / "run" / "adapter")
    from_run = fflora.load_adapter(make_model("llama"), tmp_path / "run")
    assert torch.equal(from_run(_ids()).logits, trained(_ids()).logits)
    bank = fflora.fuse(make_model("llama"), max_adapters=2)
    fflora.load_adapter(bank, tmp_path / "run", adapter_name="a")
    assert fflora.list_adapters(bank) == ["a"]
    with pytest.raises(FileNotFoundError, match="no fflora adapter at"):
        fflora.load_adapter(make_model("llama"), tmp_path)
