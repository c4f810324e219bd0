"""zFLoRA specifics; the invariants it shares with FFBA run for both in test_equivalence.py and
test_training.py (the `adapter_config` fixture)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from conftest import make_model, randomize_adapters
from transformers import LlamaConfig

import fflora
from fflora.methods.serialization import CONFIG_NAME, WEIGHTS_NAME
from fflora.methods.zflora.fused import ZFusedInputProjections, ZFusedOutputProjection, fused_state_width
from fflora.methods.zflora.layers import ZHeadMerge, ZNorm

TOL = 1e-4


def _ids(batch=2, length=9):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(0))


def test_parameter_count_is_the_design_formula():
    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152)
    # the design's 1,479,168 less the first attention's B_in, (576 + 2 * 192) * 8 = 7,680: it reads a zero state
    assert fflora.zflora_parameter_count(smollm2, fflora.ZFLoRAConfig(r=8)) == 1_479_168 - 7_680
    assert fflora.zflora_parameter_count(smollm2, fflora.ZFLoRAConfig(r=8, sub_blocks=("attn",))) == 30 * 1536 * 8 + 576 * 8 - 7_680
    assert fflora.zflora_parameter_count(smollm2, fflora.ZFLoRAConfig(r=8, sub_blocks=("mlp",))) == (
        30 * 3 * 1536 * 8 + 576 * 8 - 2 * 1536 * 8)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("sub_blocks", [("attn", "mlp"), ("attn",), ("mlp",)])
def test_trainable_parameters_match_the_formula(arch, sub_blocks):
    model = make_model(arch)
    config = fflora.ZFLoRAConfig(r=3, sub_blocks=sub_blocks)
    fflora.apply_adapter(model, config)
    assert fflora.parameter_summary(model)["trainable"] == fflora.zflora_parameter_count(model.config, config)


def test_gemma3_is_refused_and_left_untouched():
    model = make_model("gemma3_text")
    names = {n for n, _ in model.named_modules()}
    with pytest.raises(ValueError, match=r"zFLoRA does not support model type 'gemma3_text' yet: .*normalise each "
                                         r"sub-block's output.*Use FFBA"):
        fflora.apply_adapter(model, fflora.ZFLoRAConfig(r=2))
    assert {n for n, _ in model.named_modules()} == names
    assert all(p.requires_grad for p in model.parameters())


@torch.no_grad()
def test_fused_form_runs_only_widened_base_gemms():
    """q|k|v and gate|up read the (d + w)-wide norm output as it is; o_proj and down_proj write [y; dz]."""
    model = fflora.apply_adapter(make_model("qwen2"), fflora.ZFLoRAConfig(r=4, sub_blocks=("attn",)))
    fflora.fuse(model)
    w = fused_state_width(32, 4)
    assert w == 8  # 32 + 4 rounded up to a multiple of 8
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.ffba_fused_inputs, ZFusedInputProjections)
    assert layer.self_attn.ffba_fused_inputs.storage.weight.shape == (64, 32 + w)  # q|k|v rows, d + w columns
    assert isinstance(layer.self_attn.o_proj, ZFusedOutputProjection) and layer.self_attn.o_proj.storage.weight.shape == (32 + w, 32)
    assert layer.mlp.ffba_fused_inputs.storage.weight.shape == (96, 32)  # no zFLoRA on the MLP: it reads norm(h) alone
    assert layer.mlp.down_proj.storage.weight.shape == (32 + w, 48) and not layer.mlp.down_proj.storage.weight[32:].any()
    assert isinstance(layer.input_layernorm, ZNorm) and layer.input_layernorm.keep_state
    assert not layer.post_attention_layernorm.keep_state
    assert isinstance(model.model.norm, ZHeadMerge)


@torch.no_grad()
@pytest.mark.parametrize("nonzero", ["z_in", "z_merge"])
def test_each_path_is_wired(nonzero):
    """With B_m zero the state reaches the logits only through the reads of later sub-blocks, and with
    B_in zero only through the head merge: each alone must change the output, fused and unfused alike."""
    model = make_model("llama")
    base = model(_ids()).logits
    fflora.apply_adapter(model, fflora.ZFLoRAConfig(r=4))
    gen = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if name.endswith(nonzero):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    unfused = model(_ids()).logits
    assert (unfused - base).abs().max().item() > 1e-3
    fflora.fuse(model)
    assert (model(_ids()).logits - unfused).abs().max().item() < TOL


@torch.no_grad()
def test_kv_cache_keeps_the_model_width():
    model = make_model("llama")
    plain = model(_ids(), use_cache=True).cache
    fflora.apply_adapter(model, fflora.ZFLoRAConfig(r=4))
    randomize_adapters(model)
    for form in ("training", "fused"):
        cache = model(_ids(), use_cache=True).cache
        assert [tuple(layer.keys.shape) for layer in cache.layers] == [tuple(layer.keys.shape) for layer in plain.layers], form
        assert [tuple(layer.values.shape) for layer in cache.layers] == [tuple(layer.values.shape) for layer in plain.layers], form
        fflora.fuse(model)


@torch.no_grad()
def test_save_load_round_trip_in_training_and_fused_form(tmp_path):
    model = fflora.apply_adapter(make_model("mistral"), fflora.ZFLoRAConfig(r=3, alpha=5, sub_blocks=("attn",)))
    randomize_adapters(model)
    expected = model(_ids()).logits
    fflora.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["peft_type"] == "ZFLORA" and {k: meta[k] for k in ("r", "alpha", "sub_blocks", "dropout")} == {
        "r": 3, "alpha": 5, "sub_blocks": ["attn"], "dropout": 0.0}
    fresh = fflora.load_adapter(make_model("mistral"), tmp_path)
    assert fresh.ffba_config.same_adapter(model.ffba_config)
    assert torch.equal(fresh(_ids()).logits, expected)
    fused = fflora.fuse(fflora.apply_adapter(make_model("mistral"), fflora.ZFLoRAConfig(r=3, alpha=5, sub_blocks=("attn",))))
    fflora.load_adapter(fused, tmp_path)  # rewrites only the adapter rows/columns
    assert (fused(_ids()).logits - expected).abs().max().item() < TOL


@torch.no_grad()
def test_an_adapter_saved_with_the_unread_first_b_in_still_loads(tmp_path):
    """fflora 0.1.0 saved a B_in for the first attention (it read a zero state, so it never mattered)."""
    model = fflora.apply_adapter(make_model("llama"), fflora.ZFLoRAConfig(r=3))
    randomize_adapters(model)
    expected = model(_ids()).logits
    fflora.save_adapter(model, tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    state = load_file(weights)
    first, second = "base_model.model.model.layers.0.zflora.attn.z_in", "base_model.model.model.layers.1.zflora.attn.z_in"
    assert first not in state and second in state
    state[first] = torch.randn_like(state[second])
    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata()
    save_file(state, weights, metadata=metadata)
    assert torch.equal(fflora.load_adapter(make_model("llama"), tmp_path)(_ids()).logits, expected)


def test_a_zflora_adapter_does_not_load_onto_an_ffba_model_or_into_a_bank(tmp_path):
    model = fflora.apply_adapter(make_model("llama"), fflora.ZFLoRAConfig(r=2))
    fflora.save_adapter(model, tmp_path)
    ffba = fflora.apply_adapter(make_model("llama"), fflora.FFBAConfig(r=2))
    with pytest.raises(ValueError, match="carries an adapter with another configuration"):
        fflora.load_adapter(ffba, tmp_path)
    with pytest.raises(ValueError, match="is a zFLoRA adapter; an adapter bank holds FFBA adapters only"):
        fflora.load_adapter(make_model("llama"), tmp_path, adapter_name="z")
    with pytest.raises(ValueError, match="zFLoRA adapters cannot join an adapter bank"):
        fflora.fuse(model, max_adapters=2)
