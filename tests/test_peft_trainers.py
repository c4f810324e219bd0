"""FFBA and zFLoRA where PEFT models are used: transformers' Trainer (with gradient checkpointing) and TRL's
SFTTrainer(peft_config=...), on tiny models (SFTTrainer: a tiny Llama with a character-level tokenizer)."""

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

import fflora
import fflora.methods
import fflora.recipes.budget
from conftest import make_model

TEXTS = ["the cat sat on the mat.", "a dog ran in the park!", "two plus two is four.", "the sky is blue today."] * 2
CONFIGS = {"ffba": lambda: fflora.FFBAConfig(r=4, alpha=8), "zflora": lambda: fflora.ZFLoRAConfig(r=4, alpha=8)}


def _arguments(out, **kwargs) -> dict:
    return dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                use_cpu=True, save_strategy="no", logging_steps=1, seed=0, data_seed=0, **kwargs)


def _adapter_state(model) -> dict:
    return {k: v.detach().clone() for k, v in fflora.methods.adapter_parameters(model.get_base_model()).items()}


def test_trainer_with_gradient_checkpointing_trains_the_same_adapter(arch, adapter_config, tmp_path):
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 128, (4, 12), generator=gen).tolist()]
    trained = {}
    for checkpointing in (False, True):
        torch.manual_seed(1)  # the same adapter initialisation in both runs
        model = get_peft_model(make_model(arch).train(), type(adapter_config).from_dict(adapter_config.to_dict()))
        fresh = _adapter_state(model)
        args = TrainingArguments(**_arguments(tmp_path / str(checkpointing), activation_checkpointing=checkpointing))
        Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows)).train()
        trained[checkpointing] = _adapter_state(model)
        assert any(not torch.equal(trained[checkpointing][k], fresh[k]) for k in fresh)  # it trained
    for key, value in trained[False].items():
        torch.testing.assert_close(trained[True][key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_sft_trainer_takes_the_config_and_saves_what_fflora_loads(method, tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        # fp32: with TRL's default bf16, Accelerate leaves the trained model's forward under bf16 autocast
        args=SFTConfig(**_arguments(tmp_path / "run"), max_length=64, packing=False, bf16=False),
        train_dataset=Dataset.from_list([{"text": t} for t in TEXTS]),
        processing_class=tokenizer,
        peft_config=CONFIGS[method](),
    )
    assert isinstance(trainer.model, PeftModel)
    assert trainer.model.get_nb_trainable_parameters()[0] == fflora.recipes.budget.adapter_parameter_count(
        trainer.model.config, CONFIGS[method]())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    trainer.save_model(tmp_path / "adapter")
    ids = tokenizer(["the cat"], return_tensors="pt")["input_ids"]
    model = trainer.model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        loaded = fflora.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=1e-5)
