"""FFBA inside vLLM: greedy tokens from vLLM's engine on the exported folder equal fflora's own fused
model's. Needs vLLM (`make test-vllm` installs vLLM's CPU build in a venv of its own and runs these);
the default suite skips them."""

import json

import pytest
import torch
from conftest import make_model, randomize_adapters

import fflora
from fflora.recipes.export_vllm import ADAPTER_FILE, export_vllm

PROMPTS = ["hello there", "What is 2 + 2?", "abc abc abc"]


VLLM_ARCHITECTURES = {"llama": "FFBALlamaForCausalLM", "mistral": "FFBAMistralForCausalLM",
                      "qwen2": "FFBAQwen2ForCausalLM"}


@pytest.fixture(params=list(VLLM_ARCHITECTURES))
def vllm_model_dir(request, tiny_model_dir, tmp_path):
    """A tiny model of each architecture with 32-wide heads (vLLM's CPU attention takes head sizes from 32
    up), 64 wide (Qwen2: with its q/k/v biases)."""
    folder = tmp_path / f"tiny-{request.param}-64"
    make_model(request.param, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
               intermediate_size=96, max_position_embeddings=1024).save_pretrained(folder)
    fflora.load_base_model(tiny_model_dir)[1].save_pretrained(folder)
    return folder


@pytest.fixture
def exported(vllm_model_dir, tmp_path):
    """A random FFBA adapter on a tiny model (identity phi; FA and BA on both sub-blocks), exported."""
    tiny_model_dir = vllm_model_dir
    model, _ = fflora.load_base_model(tiny_model_dir)
    fflora.apply_ffba(model, fflora.FFBAConfig(r=4, alpha=8))
    randomize_adapters(model, std=0.2)
    fflora.save_adapter(model, tmp_path / "run" / "adapter")
    return export_vllm(tmp_path / "run", tmp_path / "vllm-model", str(tiny_model_dir)), tiny_model_dir


def _fflora_greedy(tiny_model_dir, adapter, prompts, new_tokens):
    """Greedy tokens of fflora's fused model (of the base model alone where `adapter` is None)."""
    model, tokenizer = fflora.load_base_model(tiny_model_dir)
    if adapter is not None:
        fflora.load_adapter(model, adapter)
    fflora.fuse(model)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   do_sample=False, min_new_tokens=new_tokens)
        out.append(generated[0, ids.shape[1]:].tolist())
    return out


def test_the_export_links_the_base_and_names_the_architecture(exported):
    folder, base = exported
    config = json.loads((folder / "config.json").read_text())
    model_type = json.loads((base / "config.json").read_text())["model_type"]
    assert config["architectures"] == [VLLM_ARCHITECTURES[model_type]] and config["fflora"]["adapter"] == ADAPTER_FILE
    # ranks, then each GEMM's extra rows / columns zero-padded to a multiple of 8 (q|k|v: 128 rows + 4)
    assert config["fflora"]["layers"][0]["attn"] == {"fa": 4, "ba_in": 0, "ba_out": 4, "in_rows": 8, "in_cols": 0,
                                                     "out_rows": 8, "out_cols": 8}
    assert config["fflora"]["layers"][1]["attn"]["in_cols"] == 8  # the previous MLP's backward adapter arrives
    assert config["fflora"]["layers"][-1]["mlp"]["ba_out"] == 0  # the last MLP has no successor
    assert (folder / "model.safetensors").resolve() == (base / "model.safetensors").resolve()


@pytest.mark.vllm
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_vllm_generates_what_fflora_generates(exported, eager):
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs this test")
    folder, base = exported
    expected = _fflora_greedy(base, folder.parent / "run", PROMPTS, 8)
    assert expected != _fflora_greedy(base, None, PROMPTS, 8)  # the adapter changes the tokens
    # on a CPU, gpu_memory_utilization is the share of RAM vLLM reserves for its KV cache
    llm = vllm.LLM(model=str(folder), dtype="float32", enforce_eager=eager, max_model_len=256, seed=0,
                   gpu_memory_utilization=0.05)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    tokenizer = fflora.load_base_model(base)[1]
    prompts = [vllm.TokensPrompt(prompt_token_ids=tokenizer(p)["input_ids"]) for p in PROMPTS]
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    assert got == expected


def test_export_refuses_what_vllm_cannot_take(tiny_model_dir, tmp_path, capsys):
    from fflora.cli import main

    zflora = fflora.apply_adapter(fflora.load_base_model(tiny_model_dir)[0], fflora.ZFLoRAConfig(r=2))
    fflora.save_adapter(zflora, tmp_path / "zflora")
    assert main(["export", "vllm", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "zflora"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "is a zflora adapter; vLLM takes FFBA adapters" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["export", "vllm", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "zflora"),
                 "--output", str(tmp_path / "full")]) == 2
    assert "exists and is not empty; give a new --output folder" in capsys.readouterr().err
    assert main(["export", "vllm", "--model", "org/model", "--adapter", str(tmp_path / "zflora"),
                 "--output", str(tmp_path / "new")]) == 2
    assert "fflora: error:" in capsys.readouterr().err
