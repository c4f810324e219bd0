import pytest
from conftest import make_model

import fflora

CONFIGS = [
    dict(r=8, alpha=16),
    dict(r=3, alpha=1, r_backward=5),
    dict(r=4, forward=False),
    dict(r=4, backward=False),
    dict(r=2, sub_blocks=("mlp",)),
    dict(r=2, sub_blocks=("attn",)),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_trainable_parameters_follow_the_design_formula(arch, kwargs):
    model = make_model(arch)
    cfg = fflora.FFBAConfig(**kwargs)
    fflora.apply_ffba(model, cfg)
    summary = fflora.parameter_summary(model)
    assert summary["trainable"] == fflora.ffba_parameter_count(model.config, cfg)
    assert summary["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_formula_by_hand_for_the_tiny_llama():
    """d=32, heads 4 x 8 (d_q=32), kv 2 x 8 = 16, inter=48, 3 layers, r=2."""
    config = make_model("llama").config
    fa = 2 * 32 * 2 + 2 * 32 * 2
    ba_attn_mlp = 32 * 2 + 2 * 48 * 2
    ba_mlp_attn = 48 * 2 + (32 + 2 * 16) * 2
    assert fflora.ffba_parameter_count(config, fflora.FFBAConfig(r=2)) == 3 * (fa + ba_attn_mlp) + 2 * ba_mlp_attn
    lora = (32 + 32) + 2 * (32 + 16) + (32 + 32) + 2 * (32 + 48) + (48 + 32)
    assert fflora.lora_parameter_count(config, 2) == 3 * lora * 2


def test_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    model = make_model("qwen2")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == fflora.lora_parameter_count(model.config, 4)


def test_print_trainable_parameters(capsys):
    model = fflora.apply_ffba(make_model("llama"), fflora.FFBAConfig(r=2))
    fflora.print_trainable_parameters(model)
    s = fflora.parameter_summary(model)
    assert capsys.readouterr().out == (
        f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || trainable%: {s['percent']:.4f}\n"
    )
