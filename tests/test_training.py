"""Invariants 3 and 4: only adapters learn; gradients survive gradient checkpointing."""

import dataclasses

import pytest
import torch
from conftest import make_model, randomize_adapters

import fflora
import fflora.methods


# zFLoRA's state is zero at the first attention, so its read B_in there gets no gradient (the
# design's parameter formula counts it; see fflora.methods.zflora.layers).
FIRST_READ = "layers.0.zflora.attn.z_in"


def _batch():
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    return ids


def _loss(model, ids):
    return model(ids, labels=ids).loss


def test_only_adapters_get_gradients_and_base_is_untouched(arch, adapter_config):
    model = make_model(arch)
    fflora.apply_adapter(model, dataclasses.replace(adapter_config, dropout=0.1))
    randomize_adapters(model)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(fflora.methods.adapter_parameters(model).values()) == {
        p for p in model.parameters() if p.requires_grad}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _loss(model, _batch()).backward()
    for n, p in model.named_parameters():
        if n.endswith(FIRST_READ):
            assert p.grad is not None and p.grad.abs().sum() == 0
        elif p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:  # (AdamW's weight decay moves even FIRST_READ)
            assert not torch.equal(p, adapters_before[n]), n
        else:
            assert torch.equal(p, base_before[n]), n


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(arch, adapter_config, use_reentrant):
    """The state crossing from layer l to l+1 (FFBA's BA, zFLoRA's residual channels) must survive
    recomputation."""
    grads = {}
    for checkpointing in (False, True):
        model = make_model(arch)
        fflora.apply_adapter(model, adapter_config)
        randomize_adapters(model)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
            assert model.model.layers[1].gradient_checkpointing
        _loss(model, _batch()).backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys()
    crossing = [n for n in grads[True] if ".mlp.ba_down" in n or ".mlp.z_out" in n]  # written by mlp l, read later
    assert len(crossing) >= make_model(arch).config.num_hidden_layers - 1
    for n in grads[False]:
        if n.endswith(FIRST_READ):
            assert grads[False][n].abs().sum() == 0
            continue
        assert grads[False][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-6, msg=n)


def test_fused_model_is_inference_only():
    """The fused buffers are not parameters: training a fused model would silently learn nothing."""
    model = make_model("llama")
    fflora.apply_ffba(model, fflora.FFBAConfig(r=4))
    fflora.fuse(model)
    assert not any(p.requires_grad and ".ffba_fused" in n for n, p in model.named_parameters())
    assert all(not b.requires_grad for n, b in model.named_buffers() if "ffba_fused" in n)
