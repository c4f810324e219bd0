"""`fflora.fuse(model, weights=...)`: bfloat16, int8 and int4 fused weights, for one adapter and the bank."""

import copy

import pytest
import torch
from conftest import make_model, randomize_adapters

import fflora
import fflora.methods
from fflora.methods.fingerprint import base_model_fingerprint
from fflora.methods.fused_model import FusedModel
from fflora.methods.weight_formats import Int8Embedding, Int8Head
from fflora.ops.int8 import dequantize_rows, int8_linear, quantize_rows
from fflora.ops.storage import Int4Storage, Int8Storage

int8_cpu = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                              reason="int8 weights need PyTorch's AVX-512 kernel")
IDS = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))


def _adapted(config, seed=1, arch="llama"):
    model = fflora.apply_adapter(make_model(arch), config)
    randomize_adapters(model, seed=seed, std=0.1)
    return model


@torch.no_grad()
def _logits(model, ids=IDS, **kw):
    return model(ids, **kw).logits.float()


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_an_unknown_format_is_refused_with_the_list():
    with pytest.raises(ValueError, match=r"unknown weight format 'int3'; fflora has \['float32', 'bfloat16', 'int8', 'int4'\]"):
        fflora.fuse(make_model("llama"), weights="int3")


def test_rows_quantize_to_int8_with_a_scale_each():
    w = torch.randn(40, 64) * torch.logspace(-3, 0, 40)[:, None]  # rows of very different ranges
    w[7] = 0
    values, scale = quantize_rows(w)
    assert values.dtype == torch.int8 and scale.dtype == torch.bfloat16 and values[7].abs().max() == 0
    back = dequantize_rows(values, scale)
    assert ((back - w).abs() <= w.abs().amax(1, keepdim=True) / 127 * 0.51 + 1e-3 * w.abs().amax(1, keepdim=True)).all()
    x = torch.randn(3, 64)
    assert _relative(int8_linear(x, values, scale).float(), x @ back.T) < 1e-2  # bfloat16 activations


@pytest.mark.parametrize("config", [fflora.FFBAConfig(r=4), fflora.ZFLoRAConfig(r=4)], ids=["ffba", "zflora"])
def test_bfloat16_fused_matches_the_bfloat16_training_form(config):
    model = _adapted(config)
    reference = _logits(_adapted(config).to(torch.bfloat16))
    fused = fflora.fuse(model, weights="bfloat16")
    assert FusedModel.of(fused).weights == "bfloat16" and fused.get_input_embeddings().weight.dtype == torch.bfloat16
    assert _relative(_logits(fused), reference) < 2e-2
    assert (_logits(fused).argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


@int8_cpu
@pytest.mark.parametrize("config", [fflora.FFBAConfig(r=4), fflora.ZFLoRAConfig(r=4)], ids=["ffba", "zflora"])
def test_int8_fused_stays_close_to_float32_and_unfuses_to_its_adapter(config):
    model = _adapted(config)
    adapter = {k: v.clone() for k, v in fflora.methods.adapter_state_dict(model).items()}
    reference = _logits(fflora.fuse(_adapted(config)))
    fused = fflora.fuse(model, weights="int8")
    head, embedding = fused.get_output_embeddings(), fused.get_input_embeddings()
    assert isinstance(head, Int8Head) and isinstance(embedding, Int8Embedding)
    assert head.values is embedding.values  # tied: one int8 copy
    assert all(isinstance(g.storage, Int8Storage) for g in FusedModel.of(fused).gemms)
    assert _relative(_logits(fused), reference) < 5e-2
    assert (_logits(fused).argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    fflora.unfuse(fused)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding and model.lm_head.weight is model.model.embed_tokens.weight
    assert next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(v, adapter[k]) for k, v in fflora.methods.adapter_state_dict(model).items())  # exact


@int8_cpu
def test_int8_weights_take_about_a_quarter_of_the_bytes():
    def nbytes(model):
        seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
        return sum(seen.values())

    dense = nbytes(fflora.fuse(make_model("llama")))
    assert nbytes(fflora.fuse(make_model("llama"), weights="int8")) < 0.35 * dense


@int8_cpu
def test_swapping_the_adapter_of_an_int8_model_rewrites_only_its_rows_and_columns(tmp_path):
    fflora.save_adapter(_adapted(fflora.FFBAConfig(r=4), seed=2), tmp_path / "b")
    model = fflora.fuse(_adapted(fflora.FFBAConfig(r=4), seed=1), weights="int8")
    group = model.model.layers[0].self_attn.ffba_fused_inputs
    base_rows = group.storage.weight_int8[: group.base_rows].clone()
    fflora.load_adapter(model, tmp_path / "b", strict=True)  # the fingerprint is the unquantized base's
    assert torch.equal(group.storage.weight_int8[: group.base_rows], base_rows)  # each row has its own scale
    direct = fflora.fuse(fflora.load_adapter(make_model("llama"), tmp_path / "b"), weights="int8")
    assert torch.equal(_logits(model), _logits(direct))


@int8_cpu
def test_the_bank_in_int8_equals_each_adapter_fused_alone(tmp_path):
    configs = {"a": fflora.FFBAConfig(r=4), "b": fflora.FFBAConfig(r=8, forward=False)}
    for seed, (name, config) in enumerate(configs.items(), start=1):
        fflora.save_adapter(_adapted(config, seed=seed), tmp_path / name)
    bank = fflora.fuse(make_model("llama"), max_adapters=2, weights="int8")
    assert base_model_fingerprint(bank) == base_model_fingerprint(make_model("llama"))
    for name in configs:
        fflora.load_adapter(bank, tmp_path / name, adapter_name=name, strict=True)
    mixed = _logits(bank, adapter_names=["a", "b"])
    for row, name in enumerate(configs):
        alone = fflora.fuse(fflora.load_adapter(make_model("llama"), tmp_path / name), weights="int8")
        assert torch.allclose(mixed[row], _logits(alone)[row], atol=1e-3, rtol=1e-3), name


@int8_cpu
def test_int8_compiles_and_a_plan_leaves_its_gemms_alone():
    model = fflora.fuse(_adapted(fflora.FFBAConfig(r=4)), weights="int8")
    eager = model.generate(IDS[:1], max_new_tokens=5, do_sample=False)
    assert fflora.plan_gemms(model, "transposed")["plans"] == {}  # no dense GEMM left to plan
    fflora.compile_decode(model)
    assert torch.equal(model.generate(IDS[:1], max_new_tokens=5, do_sample=False), eager)


def test_a_fused_model_keeps_its_format_until_unfused():
    model = fflora.fuse(make_model("llama"), weights="bfloat16")
    assert fflora.fuse(model, weights="bfloat16") is model
    with pytest.raises(ValueError, match="fused with bfloat16 weights; call fflora.unfuse"):
        fflora.fuse(model, weights="float32")


def _wide(**kw):
    return make_model("llama", hidden_size=64, intermediate_size=128, **kw)  # input widths multiples of 32


@int8_cpu
def test_int4_groups_of_32_and_an_adapter_swap_keeps_the_base_blocks(tmp_path):
    fflora.save_adapter(fflora.apply_adapter(_wide(), fflora.FFBAConfig(r=4)), tmp_path / "fresh")
    second = fflora.apply_adapter(_wide(), fflora.FFBAConfig(r=4))
    randomize_adapters(second, seed=3, std=0.1)
    fflora.save_adapter(second, tmp_path / "b")
    first = fflora.apply_adapter(_wide(), fflora.FFBAConfig(r=4))
    randomize_adapters(first, seed=2, std=0.1)
    reference = _logits(fflora.fuse(copy.deepcopy(first)))
    model = fflora.fuse(first, weights="int4")
    assert all(isinstance(g.storage, Int4Storage) for g in FusedModel.of(model).gemms)
    assert isinstance(model.get_output_embeddings(), Int8Head)
    assert _relative(_logits(model), reference) < 0.3  # 4 bits on random weights
    group = model.model.layers[1].self_attn.ffba_fused_inputs
    base_blocks = group.storage.weight_int4.clone()
    fflora.load_adapter(model, tmp_path / "b", strict=True)
    assert torch.equal(group.storage.weight_int4, base_blocks)  # the adapter's rows live apart, in float32
    fa_down = fflora.methods.adapter_parameters(model)["layers.1.attn.fa_down"]
    assert torch.equal(group.storage.rows_t[:, :4].t(), fa_down.float())  # written exactly
    direct = fflora.fuse(fflora.load_adapter(_wide(), tmp_path / "b"), weights="int4")
    assert torch.equal(_logits(model), _logits(direct))
    bank = fflora.fuse(_wide(), max_adapters=2, weights="int4")
    fflora.load_adapter(bank, tmp_path / "b", adapter_name="b", strict=True)
    fflora.load_adapter(bank, tmp_path / "fresh", adapter_name="fresh")
    assert torch.allclose(_logits(bank, adapter_names=["b", "b"]), _logits(direct), atol=1e-3, rtol=1e-3)
    eager = direct.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(fflora.compile_decode(direct).generate(IDS[:1], max_new_tokens=4, do_sample=False), eager)


@int8_cpu
def test_int4_refuses_input_widths_that_are_not_multiples_of_32_and_leaves_the_model_as_it_was():
    model = make_model("llama")  # intermediate size 48
    with pytest.raises(ValueError, match=r"int4 weights group 32 input columns; this model's GEMMs take \[48\]: use int8"):
        fflora.fuse(model, weights="int4")
    assert FusedModel.of(model) is None and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@int8_cpu
def test_a_refused_format_leaves_a_carried_adapter_in_place():
    model = _adapted(fflora.FFBAConfig(r=4))  # intermediate size 48: no int4
    before = {k: v.clone() for k, v in fflora.methods.adapter_state_dict(model).items()}
    with pytest.raises(ValueError, match="int4 weights group 32 input columns"):
        fflora.fuse(model, max_adapters=2, weights="int4")
    after = fflora.methods.adapter_state_dict(model)
    assert FusedModel.of(model) is None and after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_the_formats_bench_measures_a_trained_adapters_dev_loss_in_each_format(tiny_model_dir, tiny_data_dir, tmp_path):
    from fflora.bench.formats import FormatsBenchSettings, format_formats_table, run_formats_bench
    from fflora.recipes.evaluate import response_loss
    from fflora.recipes.train import dev_records

    base, tokenizer = fflora.load_base_model(tiny_model_dir)
    adapted = fflora.apply_adapter(copy.deepcopy(base), fflora.FFBAConfig(r=4))
    randomize_adapters(adapted, seed=5, std=0.05)
    fflora.save_adapter(adapted, tmp_path / "trained")
    settings = FormatsBenchSettings(formats=("float32", "bfloat16"), batch_sizes=(1,), prompt_len=8, new_tokens=3,
                                    repeats=1, compile=False, adapter=str(tmp_path / "trained"), dev_size=8,
                                    data_dir=str(tiny_data_dir), kinds=("fused_base", "ffba_fused"), gemm_plan="standard")
    result = run_formats_bench(base, tokenizer, settings)
    records = dev_records("commonsense", 8, tiny_data_dir)
    expected = response_loss(fflora.fuse(adapted), tokenizer, records, form="cloze")
    assert result["dev_loss"]["float32/ffba_fused"] == pytest.approx(expected, rel=1e-5)
    assert result["dev_loss"]["bfloat16/ffba_fused"] == pytest.approx(expected, rel=5e-2)
    assert "dev loss |" in format_formats_table(result)
