"""Static KV-cache slots (`fflora.serving.slots`): requests at their own positions in one step, joining
and leaving, give each request the logits a plain forward over its own tokens gives, at every step
(tiny models; a random tiny model's greedy tokens barely depend on context, its logits do)."""

import pytest
import torch
from conftest import make_model, randomize_adapters

import fflora
from fflora.serving.slots import SlotCache, slot_step, use_slots

PROMPTS = [[5, 9, 3, 17, 42], [7, 7, 1, 30, 64, 12, 5, 9, 11], [3, 4]]


@torch.no_grad()
def _alone(model, prompt, new_tokens, **kwargs):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         min_new_tokens=new_tokens, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def _run(model, schedule, new_tokens, slots=4, adapters=None):
    """Greedy decoding through slots: (tokens, logits) per request. `schedule[k]`: the step at which
    request k (PROMPTS[k]) joins, in slot `k + 1` (slot 0 stays empty); each leaves after `new_tokens`."""
    cache = SlotCache(model.config, slots, max_len=64)
    generated, logits_of = {k: [] for k in schedule}, {k: [] for k in schedule}
    for step in range(max(schedule.values()) + new_tokens + 1):
        for k, at in schedule.items():  # joins: the prompt in one prefill step, its first token from it
            if at == step:
                kwargs = {"adapter_names": [adapters[k]]} if adapters else {}
                logits = slot_step(model, cache, torch.tensor([k + 1]), torch.tensor([PROMPTS[k]]), **kwargs)
                generated[k].append(int(logits.argmax(-1)))
                logits_of[k].append(logits[0])
        running = [k for k, at in schedule.items() if at < step and len(generated[k]) < new_tokens]
        if running:  # one decode step for every running request together
            kwargs = {"adapter_names": [adapters[k] for k in running]} if adapters else {}
            logits = slot_step(model, cache, torch.tensor([k + 1 for k in running]),
                               torch.tensor([[generated[k][-1]] for k in running]), **kwargs)
            for k, token, row in zip(running, logits.argmax(-1).tolist(), logits):
                generated[k].append(token)
                logits_of[k].append(row)
    return generated, logits_of


@torch.no_grad()
def _check(model, generated, logits_of, kwargs_of):
    """Each request's step logits equal a plain forward's over its prompt and generated tokens."""
    for k, tokens in generated.items():
        ids = torch.tensor([PROMPTS[k] + tokens[:-1]])
        reference = model(input_ids=ids, **kwargs_of(k)).logits[0, len(PROMPTS[k]) - 1:]
        assert torch.stack(logits_of[k]).sub(reference).abs().max() < 1e-4, k
        assert tokens == reference.argmax(-1).tolist(), k


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_requests_joining_at_different_steps_get_what_each_gets_alone(arch):
    generated, logits_of = _run(use_slots(make_model(arch, max_position_embeddings=128)), {0: 0, 1: 2, 2: 3}, 6)
    _check(make_model(arch, max_position_embeddings=128), generated, logits_of, lambda k: {})
    if arch == "qwen2":  # greedy generate agrees too (llama's random tiny model repeats its last token)
        assert generated == {k: _alone(make_model(arch, max_position_embeddings=128), PROMPTS[k], 6) for k in range(3)}


def test_a_fused_bank_serves_each_slot_its_own_adapter(tmp_path):
    folders = {}
    for seed, name in enumerate(("a", "b"), start=1):
        adapted = fflora.apply_ffba(make_model("llama", max_position_embeddings=128), fflora.FFBAConfig(r=4))
        randomize_adapters(adapted, seed=seed, std=0.3)
        folders[name] = adapted
    expected = {0: _alone(fflora.fuse(folders["a"]), PROMPTS[0], 5), 1: _alone(fflora.fuse(folders["b"]), PROMPTS[1], 5),
                2: _alone(make_model("llama", max_position_embeddings=128), PROMPTS[2], 5)}
    bank = fflora.fuse(make_model("llama", max_position_embeddings=128), max_adapters=2)
    for name, adapted in folders.items():
        fflora.save_adapter(fflora.unfuse(adapted), tmp_path / name)
        fflora.load_adapter(bank, tmp_path / name, adapter_name=name)
    names = {0: "a", 1: "b", 2: "__base__"}
    generated, logits_of = _run(use_slots(bank), {0: 0, 1: 1, 2: 1}, 5, adapters=names)
    assert generated == expected
    bank.config._attn_implementation = "sdpa"
    _check(bank, generated, logits_of, lambda k: {"adapter_names": [names[k]]})


def test_a_step_beyond_a_slot_is_refused():
    model = use_slots(make_model("llama", max_position_embeddings=128))
    cache = SlotCache(model.config, 2, max_len=8)
    slot_step(model, cache, torch.tensor([0]), torch.tensor([[1, 2, 3, 4, 5, 6]]))
    with pytest.raises(ValueError, match="a slot holds at most 8 positions; this step would reach 9"):
        slot_step(model, cache, torch.tensor([0]), torch.tensor([[1, 2, 3]]))


@torch.no_grad()
def test_prompts_of_different_lengths_prefill_together_right_padded():
    """Three prompts in one prefill step, right-padded to the longest, then a decode step: each row's logits
    are those of a plain forward over its own tokens (the padding written past a row's end is overwritten
    before anything reads it)."""
    model = use_slots(make_model("llama", max_position_embeddings=128))
    cache = SlotCache(model.config, 3, max_len=16)
    width = max(map(len, PROMPTS[:2]))
    ids = torch.tensor([p[:width] + [0] * (width - len(p[:width])) for p in PROMPTS])
    lengths = torch.tensor([min(len(p), width) for p in PROMPTS])
    logits = slot_step(model, cache, torch.tensor([0, 1, 2]), ids, lengths)
    assert logits.shape == (3, model.config.vocab_size) and cache.lengths.tolist() == lengths.tolist()
    plain = make_model("llama", max_position_embeddings=128)
    for k, prompt in enumerate(PROMPTS):
        assert logits[k].sub(plain(input_ids=torch.tensor([prompt])).logits[0, -1]).abs().max() < 1e-4, k
    nxt = logits.argmax(-1)
    again = slot_step(model, cache, torch.tensor([0, 1, 2]), nxt[:, None])
    for k, prompt in enumerate(PROMPTS):
        reference = plain(input_ids=torch.tensor([prompt + [int(nxt[k])]])).logits[0, -1]
        assert again[k].sub(reference).abs().max() < 1e-4, k
    with pytest.raises(ValueError, match=r"each row's length must be within 1..2 \(its tokens\), got \[3, 1\]"):
        slot_step(model, cache, torch.tensor([0, 1]), torch.tensor([[1, 2], [3, 4]]), torch.tensor([3, 1]))


@torch.no_grad()
@pytest.mark.parametrize("compiled,dtype", [(False, torch.bfloat16), (True, torch.bfloat16), (True, torch.float32)],
                         ids=["eager-bfloat16", "compiled-bfloat16", "compiled-float32"])
def test_decode_steps_attend_as_sdpa_does(compiled, dtype):
    """Eager bfloat16 and every compiled decode step take `_decode_attention` (matmuls eager; multiply-and-sum
    compiled): the same numbers as SDPA's on grouped heads, each row over its own visible prefix only."""
    from fflora.serving.slots import _decode_attention

    gen = torch.Generator().manual_seed(0)
    query = torch.randn(3, 6, 1, 16, generator=gen).to(dtype)
    keys, values = (torch.randn(3, 2, 10, 16, generator=gen).to(dtype) for _ in range(2))
    visible = torch.arange(10)[None, None, :] <= torch.tensor([3, 9, 0])[:, None, None]  # rows x 1 x span
    reference = torch.nn.functional.scaled_dot_product_attention(
        query.float(), keys.float(), values.float(), attn_mask=visible[:, None], enable_gqa=True).transpose(1, 2)
    attend = torch.compile(_decode_attention, fullgraph=True) if compiled else _decode_attention
    out = attend(query, keys, values, visible, None)
    assert out.shape == (3, 1, 6, 16) and (out.float() - reference).abs().max() < (2e-2 if dtype == torch.bfloat16 else 1e-5)
    assert torch.equal(out[2, 0], values[:, :, 0].repeat_interleave(3, dim=1)[2])  # one visible position: its values  # one visible position: its values
