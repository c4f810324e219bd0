"""The adapter bank: many adapters in one fused model, chosen per batch row or per packed token.

Each request's logits in a mixed batch must equal its logits alone on a model carrying only its
adapter; base rows must equal the fused base; the bank writes only adapter rows/columns.
"""

import random

import pytest
import torch
from conftest import make_model, randomize_adapters

import fflora
from fflora.methods import BASE_NAME, bank_of

TOL = 1e-4

# Ranks 2-16, FA only, BA only, FFBA, separate BA rank, every phi.
CONFIGS = {
    "ffba4": fflora.FFBAConfig(r=4, alpha=8),
    "fa16": fflora.FFBAConfig(r=16, alpha=16, backward=False, phi="silu"),
    "ba2": fflora.FFBAConfig(r=2, alpha=4, forward=False),
    "mixed": fflora.FFBAConfig(r=6, alpha=6, r_backward=3, phi="relu"),
    "mlp8": fflora.FFBAConfig(r=8, alpha=16, sub_blocks=("mlp",)),
}


@pytest.fixture
def saved(tmp_path, arch):
    """Each adapter of CONFIGS, with random weights, saved for the tiny model of `arch`."""
    for seed, (name, config) in enumerate(CONFIGS.items(), start=1):
        model = fflora.apply_ffba(make_model(arch), config)
        randomize_adapters(model, seed=seed)
        fflora.save_adapter(model, tmp_path / name)
    return tmp_path


def _bank(arch, saved, names=CONFIGS, **fuse_kwargs):
    model = fflora.fuse(make_model(arch), max_adapters=fuse_kwargs.pop("max_adapters", 8), **fuse_kwargs)
    for name in names:
        fflora.load_adapter(model, saved / name, adapter_name=name)
    return model


def _alone(arch, saved, name):
    """A model carrying only adapter `name` (or none), fused the single-adapter way."""
    model = make_model(arch)
    if name != BASE_NAME:
        fflora.load_adapter(model, saved / name)
    return fflora.fuse(model)


def _left_padded(rows, length=10, seed=5):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(rows):
        pad = int(torch.randint(0, 5, (1,), generator=gen))
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def _mix(seed, rows=6):
    rng = random.Random(seed)
    return [rng.choice([*CONFIGS, BASE_NAME]) for _ in range(rows)]


@torch.no_grad()
@pytest.mark.parametrize("names", [["ffba4", "mlp8", BASE_NAME, "ba2", "ffba4"], _mix(0), _mix(1), ["fa16"] * 3, ["mlp8"] * 2],
                         ids=["identity-phi", "random-0", "random-1", "uniform-silu", "uniform-identity"])
def test_each_row_of_a_mixed_batch_equals_its_request_alone(arch, saved, names):
    ids, mask = _left_padded(len(names), seed=len(names))
    model = _bank(arch, saved)
    mixed = model(ids, attention_mask=mask, adapter_names=names).logits
    for row, name in enumerate(names):
        alone = _alone(arch, saved, name)(ids[row : row + 1], attention_mask=mask[row : row + 1]).logits
        valid = mask[row].bool()
        assert (mixed[row][valid] - alone[0][valid]).abs().max().item() < TOL, name


@torch.no_grad()
def test_mixed_greedy_generation_with_kv_cache_equals_each_request_alone(arch, saved):
    names = ["ffba4", BASE_NAME, "fa16", "ba2", "mixed", "mlp8", "ffba4"]
    ids, mask = _left_padded(len(names), seed=3)
    model = _bank(arch, saved)
    out = model.generate(ids, attention_mask=mask, adapter_names=names, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, name in enumerate(names):
        alone = _alone(arch, saved, name)
        expected = alone.generate(ids[row : row + 1], attention_mask=mask[row : row + 1], max_new_tokens=6,
                                  do_sample=False, pad_token_id=0)
        assert torch.equal(out[row], expected[0]), name


@torch.no_grad()
def test_kv_cache_decoding_with_a_mixed_batch_matches_full_recompute(arch, saved):
    model = _bank(arch, saved)
    names = ["fa16", "mixed", BASE_NAME]
    ids = torch.randint(3, 128, (3, 8), generator=torch.Generator().manual_seed(0))
    full = model(ids, adapter_names=names).logits
    out = model(ids[:, :5], use_cache=True, adapter_names=names)
    steps = [out.logits]
    for t in range(5, 8):
        out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True, adapter_names=names)
        steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < TOL


@torch.no_grad()
def test_base_rows_and_calls_without_names_equal_the_fused_base(arch, saved):
    ids, mask = _left_padded(3)
    fused_base = _alone(arch, saved, BASE_NAME)(ids, attention_mask=mask).logits
    model = _bank(arch, saved)
    valid = mask.bool()
    assert (model(ids, attention_mask=mask).logits - fused_base)[valid].abs().max().item() < TOL
    all_base = model(ids, attention_mask=mask, adapter_names=[BASE_NAME] * 3).logits
    assert (all_base - fused_base)[valid].abs().max().item() < TOL


@torch.no_grad()
def test_packed_batch_selects_the_adapter_of_each_token(arch, saved):
    """One row holding three requests (as a continuous-batching engine packs them), block-diagonal attention."""
    model = _bank(arch, saved)
    names, lengths = ["mixed", BASE_NAME, "fa16"], [5, 3, 6]
    gen = torch.Generator().manual_seed(4)
    requests = [torch.randint(3, 128, (1, n), generator=gen) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (segment[:, None] == segment[None, :]) & (position_ids[0][:, None] >= position_ids[0][None, :])
    with fflora.select_adapters(model, names, lengths=lengths):
        packed = model(torch.cat(requests, dim=1), position_ids=position_ids, attention_mask=allowed[None, None]).logits
    for part, name, request in zip(packed.split(lengths, dim=1), names, requests):
        assert (part - _alone(arch, saved, name)(request).logits).abs().max().item() < TOL, name
    with pytest.raises(ValueError, match="packed segment lengths add up to 13 tokens but the batch has 14"):
        with fflora.select_adapters(model, names, lengths=[5, 3, 5]):
            model(torch.cat(requests, dim=1))


@torch.no_grad()
def test_delete_then_load_restores_the_same_outputs(arch, saved):
    model = _bank(arch, saved)
    names = ["ba2", "ffba4", "mlp8"]
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    before = model(ids, adapter_names=names).logits
    fflora.delete_adapter(model, "ffba4")
    assert fflora.list_adapters(model) == ["fa16", "ba2", "mixed", "mlp8"]
    with pytest.raises(ValueError, match=r"no adapter named 'ffba4' is loaded; loaded adapters: \['fa16', 'ba2', 'mixed', 'mlp8'\]"):
        model(ids, adapter_names=names)
    fflora.load_adapter(model, saved / "ffba4", adapter_name="ffba4")
    assert (model(ids, adapter_names=names).logits - before).abs().max().item() < TOL


@torch.no_grad()
def test_the_bank_writes_only_adapter_rows_and_columns(arch, saved):
    model = fflora.fuse(make_model(arch), max_adapters=3)
    group, out = model.model.layers[1].self_attn.ffba_fused_inputs, model.model.layers[1].mlp.down_proj
    pointers = (group.storage.weight.data_ptr(), out.storage.weight.data_ptr())
    base = (group.storage.weight[: group.base_rows, : group.d_in].clone(), out.storage.weight[: out.d_out, : out.d_core].clone())
    for name in ("ffba4", "fa16", "ba2"):
        fflora.load_adapter(model, saved / name, adapter_name=name)
    model(torch.tensor([[5, 6, 7]] * 3), adapter_names=["ba2", "fa16", "ba2"])  # moves adapters to the front
    fflora.delete_adapter(model, "fa16")
    assert (group.storage.weight.data_ptr(), out.storage.weight.data_ptr()) == pointers
    assert torch.equal(group.storage.weight[: group.base_rows, : group.d_in], base[0])
    assert torch.equal(out.storage.weight[: out.d_out, : out.d_core], base[1])


@torch.no_grad()
def test_gemms_cover_only_the_adapters_present_in_the_batch(arch, saved):
    """The cost of a step follows the adapters in the batch, not all resident ones."""
    from fflora.methods.fused import ALIGN

    model = _bank(arch, saved)
    bank = bank_of(model)
    assert bank.selection([BASE_NAME, BASE_NAME]).windows == dict.fromkeys(("fa.attn", "fa.mlp", "ba.attn", "ba.mlp"), 0)
    one = bank.selection(["ba2", BASE_NAME])  # loaded fourth of five: moved to the front
    assert one.windows == {"fa.attn": 0, "fa.mlp": 0, "ba.attn": ALIGN, "ba.mlp": ALIGN}
    assert bank.entries["ba2"].offsets == dict.fromkeys(("fa.attn", "fa.mlp", "ba.attn", "ba.mlp"), 0)
    two = bank.selection(["fa16", "mlp8"])
    assert two.windows == {"fa.attn": 16, "fa.mlp": 24, "ba.attn": 0, "ba.mlp": 8}
    # One adapter whose ranks fill the window exactly, in every row: no mask to apply.
    assert bank.selection(["mlp8"] * 3).masks == {"fa.mlp": None, "ba.mlp": None}
    assert all(m is not None for m in bank.selection(["mlp8", BASE_NAME]).masks.values())


@torch.no_grad()
@pytest.mark.parametrize("names", [["mlp8"] * 2, ["mixed", BASE_NAME, "mlp8"], _mix(2)], ids=["one-adapter", "mixed", "random"])
def test_without_rearranging_adapters_stay_in_place_and_rows_are_exact(arch, saved, names):
    """What a continuous-batching engine uses: the window reaches the furthest adapter present."""
    model = _bank(arch, saved)
    bank = bank_of(model)
    offsets = {n: dict(e.offsets) for n, e in bank.entries.items()}
    ids, mask = _left_padded(len(names))
    with fflora.select_adapters(model, names, rearrange=False):
        logits = model(ids, attention_mask=mask).logits
    assert {n: e.offsets for n, e in bank.entries.items()} == offsets
    reach = bank.selection(names, rearrange=False).windows
    assert all(reach[s] >= max((bank.entries[n].end(s) for n in names if n != BASE_NAME), default=0) for s in reach)
    for row, name in enumerate(names):
        alone = _alone(arch, saved, name)(ids[row : row + 1], attention_mask=mask[row : row + 1]).logits
        assert (logits[row, mask[row].bool()] - alone[0, mask[row].bool()]).abs().max().item() < TOL, name


def test_forward_signature_keeps_the_base_parameters_generate_reads(arch):
    import inspect

    model = fflora.fuse(make_model(arch), max_adapters=2)
    params = inspect.signature(model.forward).parameters
    assert "adapter_names" in params and "logits_to_keep" in params  # prefill computes last-position logits only
    assert list(params)[-1] == "kwargs"


@torch.no_grad()
def test_generation_repeats_names_for_num_return_sequences(arch, saved):
    model = _bank(arch, saved, names=["ffba4"])
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    out = model.generate(ids, adapter_names=["ffba4", BASE_NAME], num_return_sequences=2, do_sample=True, top_k=5,
                         max_new_tokens=4, pad_token_id=0)
    assert out.shape == (4, 10)
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2 rows; give one name per row"):
        model(ids, adapter_names=["ffba4"] * 3)
    # One adapter in every row whose FA rank fills its window (no mask) but whose BA rank does not (masked).
    partial = fflora.apply_ffba(make_model(arch), fflora.FFBAConfig(r=8, r_backward=3))
    randomize_adapters(partial, seed=9)
    fflora.save_adapter(partial, saved / "fa8ba3")
    fflora.load_adapter(model, saved / "fa8ba3", adapter_name="fa8ba3")
    selection = bank_of(model).selection(["fa8ba3"])
    assert selection.masks["fa.attn"] is None and selection.masks["ba.attn"] is not None
    alone = _alone(arch, saved, "fa8ba3")  # make_model seeds torch: build it before seeding the sampler
    sample = dict(num_return_sequences=2, do_sample=True, top_k=5, max_new_tokens=3, pad_token_id=0)
    torch.manual_seed(1)
    out = model.generate(ids, adapter_names=["fa8ba3", "fa8ba3"], **sample)
    torch.manual_seed(1)
    expected = alone.generate(ids, **sample)
    assert torch.equal(out, expected)


@torch.no_grad()
def test_a_training_form_adapter_joins_the_bank_as_default(arch, saved):
    model = fflora.load_adapter(make_model(arch), saved / "mixed")
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    expected = model(ids).logits
    fflora.fuse(model, max_adapters=2)
    assert fflora.list_adapters(model) == ["default"]
    assert (model(ids, adapter_names=["default"]).logits - expected).abs().max().item() < TOL


@torch.no_grad()
def test_unfuse_drops_the_bank_and_restores_the_plain_base(arch, saved):
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    plain = make_model(arch)
    base = plain(ids).logits
    model = _bank(arch, saved, names=["ffba4"])
    fflora.unfuse(model)
    assert fflora.list_adapters(model) == [] and type(model) is type(plain)
    assert torch.equal(model(ids).logits, base)
    with pytest.raises(ValueError, match="has no adapter bank"):
        fflora.delete_adapter(model, "ffba4")


def _bank_snapshot(model):
    bank = bank_of(model)
    weights = [t.clone() for _, _, g, o in bank.blocks for t in (g.storage.weight, o.storage.weight)]
    return bank.names(), {n: dict(e.offsets) for n, e in bank.entries.items()}, weights


def _unchanged(model, snapshot):
    names, offsets, weights = _bank_snapshot(model)
    return names == snapshot[0] and offsets == snapshot[1] and all(map(torch.equal, weights, snapshot[2]))


@pytest.mark.parametrize("arch", ["llama"])
def test_bad_loads_are_refused_and_leave_the_bank_unchanged(saved, tmp_path):
    model = _bank("llama", saved, names=["ffba4", "ba2"], max_adapters=3, rank_budget=16)
    snapshot = _bank_snapshot(model)
    with pytest.raises(ValueError, match=r"an adapter named 'ffba4' is already loaded"):
        fflora.load_adapter(model, saved / "mixed", adapter_name="ffba4")
    with pytest.raises(ValueError, match=r"adapter_name must be a non-empty string other than '__base__'"):
        fflora.load_adapter(model, saved / "mixed", adapter_name=BASE_NAME)
    with pytest.raises(ValueError, match=r"no room for 'fa16' \(fa.attn: 4 used \+ 16 > 16"):
        fflora.load_adapter(model, saved / "fa16", adapter_name="fa16")
    other = fflora.apply_ffba(make_model("llama", seed=7), CONFIGS["ffba4"])
    fflora.save_adapter(other, tmp_path / "other-base")
    with pytest.raises(ValueError, match=r"a base model with other weights than this one.*strict=True"):
        fflora.load_adapter(model, tmp_path / "other-base", adapter_name="x", strict=True)
    qwen = fflora.apply_ffba(make_model("qwen2"), CONFIGS["ffba4"])
    fflora.save_adapter(qwen, tmp_path / "qwen")
    with pytest.raises(ValueError, match=r"saved for another base model.*model_type: adapter 'qwen2', model 'llama'"):
        fflora.load_adapter(model, tmp_path / "qwen", adapter_name="x")
    (saved / "ffba4" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        fflora.load_adapter(model, saved / "ffba4", adapter_name="x")
    assert _unchanged(model, snapshot)
    fflora.load_adapter(model, saved / "mlp8", adapter_name="third")
    with pytest.raises(ValueError, match=r"the adapter bank is full \(3 adapters: \['ffba4', 'ba2', 'third'\]\)"):
        fflora.load_adapter(model, saved / "mixed", adapter_name="fourth")


@pytest.mark.parametrize("arch", ["llama"])
def test_room_for_is_the_largest_sum_of_ranks_over_the_spaces_and_holds_those_adapters(saved, tmp_path):
    names = ["ffba4", "mlp8", "ba2", "mixed"]
    # fa.attn 4 + 6 = 10, fa.mlp 4 + 8 + 6 = 18, ba.attn 4 + 2 + 3 = 9, ba.mlp 4 + 8 + 2 + 3 = 17
    assert fflora.FusedModel.room_for([saved / n for n in names]) == 24  # 18, rounded up to a multiple of 8
    model = _bank("llama", saved, names=names, max_adapters=4, rank_budget=18)
    assert bank_of(model).rank_budget == 24 and bank_of(model).names() == names
    with pytest.raises(ValueError, match=r"no room for 'mixed' \(fa.mlp: 12 used \+ 6 > 16"):  # a smaller room does not hold them
        _bank("llama", saved, names=names, max_adapters=4, rank_budget=16)
    zflora = fflora.apply_adapter(make_model("llama"), fflora.ZFLoRAConfig(r=4))
    fflora.save_adapter(zflora, tmp_path / "z")
    assert fflora.FusedModel.room_for([saved / "fa16", tmp_path / "z"]) == 16  # not a bank adapter: counts nothing
    assert fflora.FusedModel.room_for([]) == 8
    with pytest.raises(FileNotFoundError, match="no fflora adapter at"):
        fflora.FusedModel.room_for([tmp_path / "nothing"])


@pytest.mark.parametrize("arch", ["llama"])
def test_unknown_names_and_misuse_get_clear_errors(saved):
    model = _bank("llama", saved, names=["ffba4"])
    ids = torch.tensor([[4, 5, 6]])
    with pytest.raises(ValueError, match=r"no adapter named 'nope' is loaded; loaded adapters: \['ffba4'\] \(and '__base__'"):
        model(ids, adapter_names=["nope"])
    with pytest.raises(ValueError, match="this model has an adapter bank; load adapters into it with adapter_name="):
        fflora.load_adapter(model, saved / "ba2")
    single = fflora.load_adapter(make_model("llama"), saved / "ba2")
    with pytest.raises(ValueError, match="carries a single FFBA adapter"):
        fflora.load_adapter(single, saved / "ffba4", adapter_name="a")
    with pytest.raises(ValueError, match="max_adapters must be an integer >= 1, got 0"):
        fflora.fuse(make_model("llama"), max_adapters=0)
    with pytest.raises(ValueError, match="fused with a single adapter; call fflora.unfuse"):
        fflora.fuse(fflora.fuse(make_model("llama")), max_adapters=2)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["mistral"])
def test_holes_left_by_deleted_adapters_are_packed_when_room_runs_out(saved):
    model = _bank("mistral", saved, names=["ffba4", "mlp8", "ba2"], max_adapters=4, rank_budget=16)
    fflora.delete_adapter(model, "ffba4")  # leaves a hole at the front of every space
    fflora.load_adapter(model, saved / "mixed", adapter_name="mixed")  # fa.mlp: 8 + 6 <= 16 only once packed
    names = ["mixed", "mlp8", "ba2"]
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(5))
    mixed = model(ids, adapter_names=names).logits
    for row, name in enumerate(names):
        assert (mixed[row] - _alone("mistral", saved, name)(ids[row : row + 1]).logits[0]).abs().max().item() < TOL


@torch.no_grad()
@pytest.mark.parametrize("arch", ["qwen2"])
def test_a_bfloat16_bank_matches_each_request_alone_within_bfloat16_noise(saved):
    model = fflora.fuse(make_model("qwen2").to(torch.bfloat16), max_adapters=3)
    for name in ("ffba4", "fa16", "ba2"):
        fflora.load_adapter(model, saved / name, adapter_name=name)
    names = ["fa16", "ba2", BASE_NAME, "ffba4"]
    ids = torch.randint(3, 128, (4, 7), generator=torch.Generator().manual_seed(6))
    mixed = model(ids, adapter_names=names).logits.float()
    for row, name in enumerate(names):
        alone = make_model("qwen2").to(torch.bfloat16)
        if name != BASE_NAME:
            fflora.load_adapter(alone, saved / name)
        expected = fflora.fuse(alone)(ids[row : row + 1]).logits.float()[0]
        assert (mixed[row] - expected).abs().max().item() < 0.05 * expected.abs().max().item(), name


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama"])
def test_the_bank_generates_through_transformers_continuous_batching(saved):
    """transformers' engine packs requests into one varlen row and runs the model in its own thread:
    the bank serves it, with the adapter chosen inside the forward call (as an engine would)."""
    from transformers import GenerationConfig

    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    model = _bank("llama", saved, names=["ffba4", "mlp8"])

    def generated(selected):
        forward = type(model).forward
        model.forward = lambda *args, **kwargs: forward(model, *args, adapter_names=selected, **kwargs)
        try:
            out = model.generate_batch(inputs=prompts, generation_config=config, warmup=False)
        finally:
            del model.forward
        return [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]

    for name in (BASE_NAME, "ffba4"):
        alone = _alone("llama", saved, name)
        expected = [alone.generate(torch.tensor([p]), generation_config=config)[0, len(p):].tolist() for p in prompts]
        assert generated([name]) == expected, name


@torch.no_grad()
@pytest.mark.parametrize("names", [_mix(3), [BASE_NAME] * 2, ["mlp8"] * 2], ids=["random", "base-only", "uniform"])
def test_fixed_windows_give_the_logits_of_the_adapters_present(arch, saved, names):
    """A compiled bank's form: every GEMM covers its whole room and the masks alone choose."""
    ids, mask = _left_padded(len(names))
    model = _bank(arch, saved)
    expected = model(ids, attention_mask=mask, adapter_names=names).logits
    bank = bank_of(model)
    offsets = {n: dict(e.offsets) for n, e in bank.entries.items()}
    bank.fix_windows()
    selection = bank.selection(names)
    assert set(selection.windows.values()) == {bank.rank_budget} and None not in selection.masks.values()
    got = model(ids, attention_mask=mask, adapter_names=names).logits
    assert (got - expected)[mask.bool()].abs().max().item() < TOL
    assert {n: e.offsets for n, e in bank.entries.items()} == offsets  # nothing moves
    assert (model(ids, attention_mask=mask).logits - _alone(arch, saved, BASE_NAME)(ids, attention_mask=mask).logits
            )[mask.bool()].abs().max().item() < TOL  # no selection: the base
