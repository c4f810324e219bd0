"""Invariants 1 and 2, for both adapter families: a fresh adapter is the identity; fused and
training forms agree."""

import pytest
import torch
from conftest import make_model, randomize_adapters

import fflora
from fflora.methods.fused import FusedInputSlice, FusedOutputProjection
from fflora.methods.layers import WrappedProjection

TOL = 1e-4


def _ids(batch=2, length=9, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_padded():
    ids = _ids(3, 10, seed=5)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0  # pad token 0 on the left
    ids[1, :1], mask[1, :1] = 0, 0
    return ids, mask


@torch.no_grad()
def test_fresh_adapter_leaves_logits_identical(arch, adapter_config):
    model = make_model(arch)
    ids = _ids()
    base = model(ids).logits
    fflora.apply_ffba(model, adapter_config)
    assert torch.equal(model(ids).logits, base)
    fflora.fuse(model)  # one bigger GEMM sums in another order: equal to float tolerance
    assert (model(ids).logits - base).abs().max().item() < TOL


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_fused_matches_unfused_logits_and_greedy_generation(arch, adapter_config, padded):
    model = make_model(arch)
    fflora.apply_ffba(model, adapter_config)
    randomize_adapters(model)
    ids, mask = _left_padded() if padded else (_ids(), None)
    unfused = model(ids, attention_mask=mask).logits
    gen_unfused = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    fflora.fuse(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, FusedInputSlice)
    fused = model(ids, attention_mask=mask).logits
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    assert (fused - unfused)[valid].abs().max().item() < TOL
    gen_fused = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen_fused, gen_unfused)


@torch.no_grad()
def test_fused_sampling_matches_unfused_with_same_seed(arch, adapter_config):
    model = make_model(arch)
    fflora.apply_ffba(model, adapter_config)
    randomize_adapters(model)
    ids = _ids()
    torch.manual_seed(3)
    a = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    fflora.fuse(model)
    torch.manual_seed(3)
    b = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    assert torch.equal(a, b)


@torch.no_grad()
def test_kv_cache_decoding_matches_full_recompute_when_fused(arch, adapter_config):
    """Decode with the cache token by token == one forward over the whole sequence."""
    model = make_model(arch)
    fflora.apply_ffba(model, adapter_config)
    randomize_adapters(model)
    fflora.fuse(model)
    ids = _ids(1, 8)
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)
    steps = [out.logits]
    for t in range(5, 8):
        out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < TOL


@torch.no_grad()
def test_unfuse_restores_training_form_exactly(arch, adapter_config):
    model = make_model(arch)
    fflora.apply_ffba(model, adapter_config)
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    ids = _ids()
    logits = model(ids).logits
    fflora.unfuse(fflora.fuse(model))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert isinstance(model.model.layers[0].self_attn.q_proj, WrappedProjection)
    assert torch.equal(model(ids).logits, logits)


@torch.no_grad()
def test_fused_base_without_adapter_matches_base(arch):
    model = make_model(arch)
    ids, mask = _left_padded()
    base = model(ids, attention_mask=mask).logits
    fflora.fuse(model)
    assert isinstance(model.model.layers[1].mlp.down_proj, FusedOutputProjection)
    assert (model(ids, attention_mask=mask).logits - base).abs().max().item() < TOL
    fflora.unfuse(model)
    assert torch.equal(model(ids, attention_mask=mask).logits, base)


@torch.no_grad()
@pytest.mark.parametrize(
    "kwargs, nonzero",
    [
        ({"forward": True, "backward": False}, ("fa_up",)),
        ({"forward": False, "backward": True}, ("ba_up",)),
        ({"forward": True, "backward": True}, ("fa_up", "ba_up")),
        ({"forward": False, "backward": True, "sub_blocks": ("mlp",)}, ("ba_up",)),  # only the layer crossing
        ({"forward": False, "backward": True, "sub_blocks": ("attn",)}, ("ba_up",)),
        ({"forward": True, "backward": True, "phi": "silu", "r_backward": 2}, ("fa_up", "ba_up")),
    ],
)
def test_each_path_is_wired(arch, kwargs, nonzero):
    """Only the named up-projections get non-zero values; outputs must change, fused and unfused alike."""
    model = make_model(arch)
    ids = _ids()
    base = model(ids).logits
    fflora.apply_ffba(model, fflora.FFBAConfig(r=4, alpha=8, **kwargs))
    gen = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in nonzero:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    unfused = model(ids).logits
    assert (unfused - base).abs().max().item() > 1e-3
    fflora.fuse(model)
    assert (model(ids).logits - unfused).abs().max().item() < TOL


@torch.no_grad()
def test_output_hidden_states_keep_model_width(arch, adapter_config):
    model = make_model(arch)
    fflora.apply_ffba(model, adapter_config)
    randomize_adapters(model)
    out = model(_ids(), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert {tuple(h.shape) for h in out.hidden_states} == {(2, 9, model.config.hidden_size)}


def test_unsupported_architecture_is_refused():
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match=r"does not support model type 'gpt2'; supported model types are \['gemma3_text', 'llama', 'mistral', 'qwen2'\]"):
        fflora.apply_ffba(model, fflora.FFBAConfig())
    with pytest.raises(ValueError, match="does not support model type 'gpt2'"):
        fflora.fuse(model)


def test_applying_twice_is_refused():
    model = make_model("llama")
    fflora.apply_ffba(model, fflora.FFBAConfig(r=2))
    with pytest.raises(ValueError, match="already has adapters"):
        fflora.apply_ffba(model, fflora.FFBAConfig(r=2))


@torch.no_grad()
def test_remove_ffba_restores_the_base_model(arch, adapter_config):
    model = make_model(arch)
    ids = _ids()
    base = model(ids).logits
    keys = set(model.state_dict())
    fflora.apply_ffba(model, adapter_config)
    randomize_adapters(model)
    fflora.fuse(model)
    fflora.remove_ffba(model)
    assert set(model.state_dict()) == keys
    assert type(model.model.layers[0]).__name__ == type(make_model(arch).model.layers[0]).__name__
    assert torch.equal(model(ids).logits, base)


@torch.no_grad()
def test_bfloat16_model_fuses_within_bfloat16_noise(arch, adapter_config):
    model = make_model(arch).to(torch.bfloat16)
    fflora.apply_ffba(model, adapter_config)
    randomize_adapters(model)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    ids = _ids()
    unfused = model(ids).logits.float()
    fflora.fuse(model)
    fused = model(ids).logits.float()
    assert (fused - unfused).abs().max().item() < 0.05 * unfused.abs().max().item()


def test_a_projection_that_is_not_nn_linear_is_refused_before_anything_changes():
    class Quantized(torch.nn.Linear):
        pass

    model = make_model("llama")
    old = model.model.layers[2].mlp.down_proj
    model.model.layers[2].mlp.down_proj = Quantized(old.in_features, old.out_features, bias=False)
    with pytest.raises(ValueError, match=r"mlp\.down_proj is a Quantized; load the base model unquantized"):
        fflora.apply_ffba(model, fflora.FFBAConfig(r=2))
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model.model.layers[0], "ffba") and type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"


def test_fused_gemms_widened_by_adapters_have_aligned_sizes():
    """Odd GEMM sizes are slow on CPU: adapter rows/columns are zero-padded to a multiple of 8."""
    from fflora.methods.fused import ALIGN

    model = fflora.apply_ffba(make_model("qwen2"), fflora.FFBAConfig(r=3, r_backward=5))
    fflora.fuse(model)
    attn = model.model.layers[1].self_attn
    assert attn.ffba_fused_inputs.storage.weight.shape == (64 + ALIGN, 32 + ALIGN)  # q|k|v = 64 rows + 3; d = 32 + 5
    assert attn.o_proj.storage.weight.shape == (32 + ALIGN, 32 + ALIGN)
    plain = fflora.fuse(make_model("qwen2")).model.layers[1].self_attn
    assert plain.ffba_fused_inputs.storage.weight.shape == (64, 32)  # no adapter, no padding
