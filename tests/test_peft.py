"""FFBA and zFLoRA through PEFT: get_peft_model, save_pretrained, PeftModel.from_pretrained, disable_adapter,
merge_and_unload, unload, on tiny models of every architecture each method supports."""

import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

import fflora
import fflora.methods
import fflora.methods.registration
import fflora.recipes.budget
from fflora.methods.fused_model import FusedModel
from conftest import make_model, randomize_adapters

IDS = torch.tensor([[5, 9, 3, 17, 42, 8, 11, 2], [7, 7, 1, 30, 64, 12, 5, 9]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def expected_count(model, config):
    count = fflora.zflora_parameter_count if isinstance(config, fflora.ZFLoRAConfig) else fflora.ffba_parameter_count
    return count(model.config, config)


def peft_model(arch, config):
    base = make_model(arch)
    model = get_peft_model(base, config)
    randomize_adapters(model)
    return model


def test_import_registers_both_methods():
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING["FFBA"] is fflora.FFBAConfig
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING["FFBA"] is fflora.FFBAModel
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING["ZFLORA"] is fflora.ZFLoRAConfig
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING["ZFLORA"] is fflora.ZFLoRAModel
    fflora.methods.registration.register()  # idempotent
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING["FFBA"] is fflora.FFBAModel


@pytest.mark.parametrize("imports", ["import fflora; import peft", "import peft; import fflora",
                                     "import fflora; fflora.FFBAConfig",  # fflora's own modules import PEFT
                                     "import fflora.methods.serialization",
                                     # an availability check first (transformers makes one) imports nothing
                                     "import fflora, importlib.util; importlib.util.find_spec('peft'); import peft"])
def test_import_fflora_registers_with_peft_in_any_order(imports):
    code = f"""{imports}
import sys
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
print(PEFT_TYPE_TO_CONFIG_MAPPING["FFBA"].__name__, PEFT_TYPE_TO_TUNER_MAPPING["ZFLORA"].__name__)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["FFBAConfig", "ZFLoRAModel"]


def test_configs_are_peft_configs_and_round_trip(tmp_path):
    config = fflora.FFBAConfig(r=4, alpha=8, r_backward=2, sub_blocks=("mlp",), phi="silu", task_type="CAUSAL_LM")
    assert isinstance(config, peft.PeftConfig) and config.peft_type == "FFBA"
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FFBA" and saved["r"] == 4 and saved["sub_blocks"] == ["mlp"]
    again = peft.PeftConfig.from_pretrained(tmp_path)
    assert type(again) is fflora.FFBAConfig and again == config and again.sub_blocks == ("mlp",)
    with pytest.raises(ValueError, match=r"FFBAConfig\.peft_type must be 'FFBA', got 'LORA'"):
        fflora.FFBAConfig(peft_type="LORA")


def test_get_peft_model_trains_exactly_the_adapter(arch, adapter_config, capsys):
    base = make_model(arch)
    model = get_peft_model(base, adapter_config)
    assert isinstance(model, PeftModel)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected_count(base, adapter_config)
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out
    # a fresh adapter is the base model
    torch.testing.assert_close(logits(model), logits(make_model(arch)), rtol=0, atol=1e-6)


def test_save_and_from_pretrained_reproduce_the_logits(arch, adapter_config, tmp_path):
    model = peft_model(arch, adapter_config)
    want = logits(model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(make_model(arch), tmp_path)
    assert type(loaded.peft_config["default"]) is type(adapter_config)
    torch.testing.assert_close(logits(loaded), want, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference, as PEFT does
    trainable = PeftModel.from_pretrained(make_model(arch), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == expected_count(trainable, adapter_config)


def test_disable_adapter_gives_the_base_logits(arch, adapter_config):
    model = peft_model(arch, adapter_config)
    adapted, base = logits(model), logits(make_model(arch))
    assert (adapted - base).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=1e-6)


def test_merge_and_unload_is_the_fused_form(arch, adapter_config):
    model = peft_model(arch, adapter_config)
    want = logits(model)
    merged = model.merge_and_unload()
    assert not isinstance(merged, PeftModel) and not hasattr(merged, "peft_config")
    assert FusedModel.of(merged) is not None
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())  # PEFT's own test of an unloaded model
    assert fflora.methods.adapter_parameters(merged) == {} and not fflora.methods.has_adapter(merged)
    assert not any(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(logits(merged), want, rtol=1e-4, atol=1e-4)
    fflora.unfuse(merged)  # the adapter lived only in the fused rows: the plain base model, as loaded
    base = make_model(arch)
    assert dict(merged.named_parameters()).keys() == dict(base.named_parameters()).keys()
    assert type(merged.model.layers[0]) is type(base.model.layers[0])
    torch.testing.assert_close(logits(merged), logits(base), rtol=0, atol=1e-6)


def test_merge_adapter_fuses_in_place_and_unmerge_restores(arch, adapter_config):
    model = peft_model(arch, adapter_config)
    want = logits(model)
    model.merge_adapter()
    assert FusedModel.of(model.get_base_model()) is not None
    torch.testing.assert_close(logits(model), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"call unmerge_adapter\(\) before switching it off"):
        with model.disable_adapter():
            pass
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-6)


def test_unload_returns_the_base_model(arch, adapter_config):
    model = peft_model(arch, adapter_config)
    base = model.unload()
    assert not isinstance(base, PeftModel) and getattr(base, "ffba_config", None) is None
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    torch.testing.assert_close(logits(base), logits(make_model(arch)), rtol=0, atol=1e-6)


def test_operations_ffba_cannot_honour_name_the_alternative():
    model = peft_model("llama", fflora.FFBAConfig(r=4))
    with pytest.raises(ValueError, match=r"holds one FFBA or zFLoRA adapter.*adapter bank"):
        model.add_adapter("second", fflora.FFBAConfig(r=2))
    assert list(model.peft_config) == ["default"]  # PEFT undid the failed add
    with pytest.raises(ValueError, match=r"cannot be combined by weights"):
        model.base_model.add_weighted_adapter(["default"], [1.0], "mix")
    with pytest.raises(ValueError, match=r"unload\(\) takes it off"):
        model.delete_adapter("default")


@pytest.mark.parametrize("method", ["ffba", "zflora", "lora"])
def test_every_trainable_parameter_gets_a_gradient(arch, method):
    if method == "zflora" and arch == "gemma3_text":
        pytest.skip("zFLoRA refuses Gemma 3")
    configs = {"ffba": fflora.FFBAConfig(r=4), "zflora": fflora.ZFLoRAConfig(r=4),
               "lora": peft.LoraConfig(r=4, target_modules=fflora.recipes.budget.LORA_TARGETS)}
    model = peft_model(arch, configs[method])
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    dead = [name for name, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert dead == []


def test_zflora_first_sub_block_does_not_read_the_state():
    """Its B_in would multiply a state that is still zero: it is not built, counted or saved."""
    model = get_peft_model(make_model("llama"), fflora.ZFLoRAConfig(r=8))
    first = model.get_base_model().model.layers[0].zflora
    assert first.attn.z_in is None and first.mlp.z_in is not None
    assert "layers.0.attn.z_in" not in fflora.methods.adapter_parameters(model.get_base_model())
    mlp_first = get_peft_model(make_model("llama"), fflora.ZFLoRAConfig(r=8, sub_blocks=("mlp",)))
    assert mlp_first.get_base_model().model.layers[0].zflora.mlp.z_in is None
    assert mlp_first.get_nb_trainable_parameters()[0] == fflora.zflora_parameter_count(
        mlp_first.config, fflora.ZFLoRAConfig(r=8, sub_blocks=("mlp",)))


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("kind", ["ffba", "zflora"])
def test_one_format_both_ways(kind, tmp_path):
    """fflora.save_adapter writes PEFT's files; PEFT loads them, and fflora loads what PEFT saved."""
    config = {"ffba": fflora.FFBAConfig(r=4, r_backward=2), "zflora": fflora.ZFLoRAConfig(r=4)}[kind]
    model = fflora.apply_adapter(make_model("qwen2"), config)
    randomize_adapters(model)
    want = logits(model)
    fflora.save_adapter(model, tmp_path / "fflora")
    assert sorted(p.name for p in (tmp_path / "fflora").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(tmp_path / "fflora" / "adapter_model.safetensors", framework="pt") as f:
        names, metadata = set(f.keys()), f.metadata()
    assert all(n.startswith("base_model.model.model.") for n in names) and len(names) == len(
        fflora.methods.adapter_parameters(model))
    assert json.loads(metadata["fflora_base_model"])["model_type"] == "qwen2"
    via_peft = PeftModel.from_pretrained(make_model("qwen2"), tmp_path / "fflora")
    torch.testing.assert_close(logits(via_peft), want, rtol=0, atol=1e-6)
    via_peft.save_pretrained(tmp_path / "peft")
    back = fflora.load_adapter(make_model("qwen2"), tmp_path / "peft")
    assert back.ffba_config.same_adapter(config)
    torch.testing.assert_close(logits(back), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["ffba", "zflora"])
def test_adapters_in_the_old_format_still_load(kind, tmp_path):
    """tests/fixtures/fflora-0.1.0-*: written by fflora 0.1.0 (its own adapter.safetensors and config) on
    conftest.make_model("llama"), with the logits they gave; the zFLoRA one has the unread first B_in."""
    fixture = FIXTURES / f"fflora-0.1.0-{kind}"
    want = load_file(fixture / "expected_logits.safetensors")["logits"]
    model = fflora.load_adapter(make_model("llama"), fixture)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-6)
    fflora.save_adapter(model, tmp_path)  # and saved again, in PEFT's format
    torch.testing.assert_close(logits(fflora.load_adapter(make_model("llama"), tmp_path)), want, rtol=0, atol=1e-6)


def test_a_peft_lora_folder_is_refused_with_what_it_is(tmp_path):
    lora = get_peft_model(make_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is a PEFT LORA adapter, not FFBA or zFLoRA: load it with "
                                         r"peft\.PeftModel\.from_pretrained"):
        fflora.load_adapter(make_model("llama"), tmp_path)
