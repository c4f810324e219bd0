"""Fine-tuning recipe: FFBA, zFLoRA, LoRA (PEFT) or full fine-tuning on transformers' Trainer.

The Trainer gives the progress bar, data-parallel runs under `torchrun` / `accelerate launch`,
and exact resumption (optimizer, scheduler, RNG and data position). fflora adds:
  * FFBA and zFLoRA checkpoints hold only the adapter (`fflora.save_adapter`);
  * checkpoints are written to a staging folder and renamed into place, so a crash never leaves
    a half-written `checkpoint-N` for `--resume` to pick up;
  * a non-finite loss stops the run before it reaches the weights, keeping the last good checkpoint;
    with `max_loss_ratio`, so does a loss spike (a run that blows up without reaching NaN);
  * loss on the response tokens only, with logits computed at those positions alone, on packed
    batches (no padded compute; `fflora.recipes.examples`), in float32 or bfloat16 autocast, chosen by a
    short measurement once per machine and model (`dtype="auto"`, kept in the cache);
  * JSONL logs (every step's gradient norm before clipping in grad_norms.jsonl); parameter counts,
    tokens/s, the loss curve and how often clipping cut the gradient in the run record.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from ..methods import has_adapter, load_adapter, parameter_summary, registry, save_adapter
from ..methods.adapter_files import RUN_ADAPTER, RUN_FILE
from ..models.base_models import load_base_model
from ..utils.errors import FFloraError
from ..utils.files import atomic_write_text, read_jsonl
from ..utils.sources import say
from .budget import LORA_TARGETS, adapter_parameter_count, lora_parameter_count, match_adapter_rank
from .data import load_split
from .dtype import choose_dtype
from .evaluate import response_loss
from .examples import check_form, pack, packed_attention_while, token_nll, tokenize_example
from .settings import TRAIN_DATASETS, TrainConfig
from .user_data import FORMATS, held_out_user_records, split_user_data

CONFIG_FILE = "train_config.json"
GRAD_NORMS_FILE = "grad_norms.jsonl"  # {"step", "grad_norm"} per optimizer step, before clipping


DEV_SEED = 20251031  # one fixed draw: every run of a task holds out the same dev records


def dev_records(task: str, dev_size: int, data_dir=None) -> list[dict]:
    """The dev split: `dev_size` records of the task's training mixture (an equal share per data
    set, drawn with a fixed seed), never trained on when a run sets dev_size, never a test set."""
    if not dev_size:
        return []
    datasets = TRAIN_DATASETS[task]
    per_set = max(1, dev_size // len(datasets))
    held = []
    for i, name in enumerate(datasets):
        split = load_split(name, "train", data_dir)
        held += random.Random(DEV_SEED + i).sample(split, min(per_set, len(split)))
    return held


def held_out_records(cfg: TrainConfig) -> list[dict]:
    """The records a run holds out and scores its dev loss on: of its task's mixture (`dev_size`,
    none by default), or of its own data (`dev_size`, by default 5% up to 200)."""
    if cfg.data is None:
        return dev_records(cfg.task, cfg.dev_size, cfg.data_dir)
    return held_out_user_records(cfg.data, cfg.dev_size)


def training_records(cfg: TrainConfig) -> list[dict]:
    """The training mixture: every train split of the task without the dev records, each capped
    at train_limit / #datasets examples drawn with the run's seed (a balanced subset), shuffled
    together. With `data`: the user's records without the held-out ones, at most train_limit."""
    rng = random.Random(cfg.seed)
    if cfg.data is not None:  # one read of the user's file: the split held_out_records makes too
        records, held_out, kind = split_user_data(cfg.data, cfg.dev_size)
        say(f"{cfg.data}: {FORMATS[kind]}; {len(records)} records to train on, {len(held_out)} held out")
        return rng.sample(records, min(len(records), cfg.train_limit or len(records)))  # a shuffled draw
    held_out = {r["id"] for r in held_out_records(cfg)}
    datasets = TRAIN_DATASETS[cfg.task]
    records = []
    for name in datasets:
        split = [r for r in load_split(name, "train", cfg.data_dir) if r["id"] not in held_out]
        if cfg.train_limit:
            split = rng.sample(split, min(len(split), max(1, cfg.train_limit // len(datasets))))
        records += split
    rng.shuffle(records)
    return records


def build_dataset(tokenizer, records: list[dict], max_length: int, form: str = "instruction"):
    from datasets import Dataset

    check_form(form, records)
    examples = [tokenize_example(tokenizer, r, max_length, form) for r in records]
    kept = [e for e in examples if e is not None]
    if not kept:
        raise ValueError(f"every training example's prompt takes all of max_length={max_length} tokens, leaving no "
                         "room for its response; raise --max-length")
    if len(kept) < len(examples):
        say(f"dropped {len(examples) - len(kept)} of {len(examples)} examples: their prompt takes all {max_length} "
            "tokens, leaving no room for a response token (raise --max-length to keep them)")
    return Dataset.from_list(kept)


def prepare_model(cfg: TrainConfig, model: nn.Module) -> tuple[nn.Module, dict]:
    """Attach the method's trainable parameters; returns (model, parameter record)."""
    counts = {"lora_r": cfg.lora_r, "lora_params_at_lora_r": lora_parameter_count(model.config, cfg.lora_r)}
    if cfg.method in registry.names():  # an fflora method
        variant = dict(phi=cfg.phi, sub_blocks=tuple(cfg.sub_blocks.split(",")), forward=cfg.forward, backward=cfg.backward)
        r = match_adapter_rank(model.config, cfg.lora_r, cfg.method, **variant) if cfg.match_params else cfg.r
        alpha = cfg.alpha * r / cfg.r if cfg.match_params else cfg.alpha  # keep alpha / r when matching
        adapter = registry.make_config(cfg.method, r=r, alpha=alpha, dropout=cfg.dropout, task_type="CAUSAL_LM", **variant)
        model = get_peft_model(model, adapter)  # the same path as LoRA's: a PeftModel for the Trainer
        # "ffba_*" keys name the fflora adapter of either family (run records predate zFLoRA)
        counts.update(ffba_r=r, ffba_config=adapter.method_fields(), ffba_params=adapter_parameter_count(model.config, adapter))
    elif cfg.method == "lora":
        model = get_peft_model(model, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout,
            target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
        ))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    counts.update(parameter_summary(model))
    return model, counts


class JsonlLogger(TrainerCallback):
    """Appends every Trainer log record (loss, learning rate, ...) to logs.jsonl, with wall time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "time_s": round(time.time() - self.start, 3), **logs}) + "\n")


class TrainingDivergedError(FFloraError):
    """Training broke down (the learning rate is too high for the method, or the data is bad)."""


class NonFiniteLossError(TrainingDivergedError):
    """The loss became NaN or infinite; the run stopped before the update."""


class LossSpikeError(TrainingDivergedError):
    """A logged training loss rose above `max_loss_ratio` times the run's first logged loss."""


class LossSpikeGuard(TrainerCallback):
    """Stops a run whose logged loss (the mean over `logging_steps`) exceeds `ratio` times its first
    logged loss. A NaN check misses a run that blows up and then limps on at a loss many times its
    starting one (LoRA at lr 1e-2 on SmolLM2: 0.96 -> 3.7 -> 12.3 over 40 steps, still finite).
    The reference is the first logged loss of the run's history, which a resumed run restores."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def on_log(self, args, state, control, logs=None, **kwargs):
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        if len(losses) > 1 and losses[-1] > self.ratio * losses[0]:
            last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
            raise LossSpikeError(
                f"loss spike: {losses[-1]:.4g} at step {state.global_step}, above {self.ratio:g} x the first "
                f"logged loss ({losses[0]:.4g}). Last checkpoint: {last or 'none yet'}. Lower --lr, or raise "
                "--max-loss-ratio if such spikes are expected."
            )


class FFLoraTrainer(Trainer):
    """Trainer with the response-token loss on labelled positions only, adapter-only FFBA
    checkpoints, atomic checkpoint folders, a loss guard and a count of the tokens trained on."""

    _staging = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The loss below is normalised by the labelled tokens of the whole accumulated batch (as
        # transformers' causal-LM loss is), so the Trainer must count them and not rescale it.
        self.model_accepts_loss_kwargs = True
        self.tokens_seen = 0  # real (unpadded) tokens of the training steps this process ran

    def _clip_grad_norm(self, model):
        """The Trainer's clipping, with every step's norm before it appended to grad_norms.jsonl: the
        Trainer logs the norm of one step in `logging_steps`, and how often clipping cuts the update
        needs them all (FFBA's norm runs 20-70x LoRA's at the same rate)."""
        norm = super()._clip_grad_norm(model)
        if self.is_world_process_zero():
            with open(Path(self.args.output_dir) / GRAD_NORMS_FILE, "a") as f:
                f.write(json.dumps({"step": self.state.global_step + 1, "grad_norm": float(norm)}) + "\n")
        return norm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        self.tokens_seen += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        nll = token_nll(model, inputs)
        if num_items_in_batch is None:
            loss = nll.mean()
        else:
            loss = nll.sum() / num_items_in_batch
            if self.args.average_tokens_across_devices:  # DDP averages gradients over processes
                loss = loss * self.accelerator.num_processes
        finite = torch.isfinite(loss.detach()).all().to(torch.int32)
        if self.args.world_size > 1:  # every rank must stop together
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite.item():
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1}; stopped before it reached "
                f"the weights. Last good checkpoint: {last or 'none yet'}. Lower --lr or check the data, then --resume."
            )
        return (loss, None) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not has_adapter(model):
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            save_adapter(model, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self.accelerator.unwrap_model(model or self.model)
        if has_adapter(target):
            load_adapter(target, resume_from_checkpoint, strict=True)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _get_output_dir(self, trial) -> str:
        if self._staging:
            return os.path.join(self.args.output_dir, ".staging")
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        staging = Path(self.args.output_dir) / ".staging"
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)  # debris of a crash mid-save
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = Path(self.args.output_dir) / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=self.args.output_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()


def _check_resume(cfg: TrainConfig, out: Path, resume: bool) -> str | None:
    """The checkpoint to resume from; refuses to overwrite a run or to resume a different one."""
    saved = out / CONFIG_FILE
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if not resume:
        if saved.exists() or last:
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --output-dir")
        return None
    if not saved.exists():
        raise ValueError(f"nothing to resume in {out}: no {CONFIG_FILE}; start the run without --resume")
    before = json.loads(saved.read_text())
    # A setting missing from the saved file was added to fflora after the run started: it had its default.
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    diffs = [f"{k}: {before.get(k, defaults[k])!r} -> {v!r}" for k, v in asdict(cfg).items()
             if before.get(k, defaults[k]) != v]
    if diffs:
        raise ValueError(f"--resume with other settings than the run in {out}: " + "; ".join(diffs))
    return last


def collator(tokenizer, packing: bool):
    """Packed rows (`fflora.recipes.examples.pack`), or right-padded ones with an attention mask."""
    if packing:
        return pack
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


def train(cfg: TrainConfig, resume: bool = False, model=None, tokenizer=None) -> dict:
    """Run one fine-tuning job; returns the run record (also written to OUTPUT_DIR/run.json)."""
    out = Path(cfg.output_dir)
    checkpoint = _check_resume(cfg, out, resume)
    records = training_records(cfg)  # before the model: data that is missing or empty fails at once
    if model is None:
        model, tokenizer = load_base_model(cfg.model)
    tokenizer.padding_side = "right"  # training pads on the right; generation pads on the left
    torch.manual_seed(cfg.seed)  # adapter initialisation
    dataset = build_dataset(tokenizer, records, cfg.max_length, cfg.form)
    model, counts = prepare_model(cfg, model)
    out.mkdir(parents=True, exist_ok=True)
    collate = collator(tokenizer, cfg.packing)
    with packed_attention_while(model, cfg.packing):
        first_batch = collate([dataset[i] for i in range(min(cfg.batch_size, len(dataset)))])
        dtype = choose_dtype(cfg.dtype, model, first_batch, out, resume)
        say(f"training in {dtype['dtype']} ({dtype['why']}"
            + (", s/step " + ", ".join(f"{k} {v:.2f}" for k, v in dtype["seconds_per_step"].items())
               if "seconds_per_step" in dtype else "") + ")")
        return _run_trainer(cfg, model, tokenizer, dataset, collate, dtype, counts, checkpoint)


def _run_trainer(cfg: TrainConfig, model, tokenizer, dataset, collate, dtype: dict, counts: dict,
                 checkpoint: str | None) -> dict:
    out = Path(cfg.output_dir)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        # 0 turns clipping off; the Trainer then skips computing the norm too, which grad_norms.jsonl
        # records: clipping at infinity measures every step's norm and scales nothing.
        max_grad_norm=cfg.max_grad_norm or math.inf,
        warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type="linear",
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=dtype["dtype"] == "bfloat16",
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
        activation_checkpointing=cfg.gradient_checkpointing,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = FFLoraTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collate,
        callbacks=[JsonlLogger(out / "logs.jsonl")] + ([LossSpikeGuard(cfg.max_loss_ratio)] if cfg.max_loss_ratio else []),
    )
    if trainer.is_world_process_zero():
        atomic_write_text(out / CONFIG_FILE, json.dumps(asdict(cfg), indent=2) + "\n")
        say(f"{cfg.method}: {counts['trainable']:,} trainable of {counts['total']:,} parameters "
            f"({counts['percent']:.3f}%), {len(dataset)} training examples")
    start = time.time()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.time() - start
    record = {
        "config": asdict(cfg),
        "parameters": counts,
        "examples": len(dataset),
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "wall_time_s": wall,
        "steps_run": trainer.state.global_step - _step_of(checkpoint),  # by this process, since it (re)started
        "seconds_per_step": wall / max(trainer.state.global_step - _step_of(checkpoint), 1),
        "tokens": trainer.tokens_seen,  # real tokens trained on by this process since it (re)started
        "tokens_per_s": trainer.tokens_seen / wall,
        "dtype": dtype,
        "world_size": args.world_size,
        "resumed_from": checkpoint,
        "adapter_dir": str(out / RUN_ADAPTER),
        "loss_curve": loss_curve(out),
        "grad_norm": grad_norm_summary(out, cfg.max_grad_norm),
    }
    held_out = held_out_records(cfg)
    if held_out:
        # float32, whatever the training dtype: the same figure for every run and the base model
        record["dev_loss"] = response_loss(trainer.accelerator.unwrap_model(trainer.model), tokenizer, held_out,
                                           cfg.max_length, form=cfg.form)
        record["dev_records"] = len(held_out)
    if trainer.is_world_process_zero():
        _save_final(trainer, out / RUN_ADAPTER, tokenizer)
        atomic_write_text(out / RUN_FILE, json.dumps(record, indent=2) + "\n")
    _close_process_group(trainer)
    return record


def _close_process_group(trainer: Trainer) -> None:
    """Every process waits for the others' saves, then the process group is closed: a process that
    exits with gloo's threads still running can abort ("terminate called without an active exception").

    The DDP wrapper goes first, while the group is still registered: its reducer holds the group, and
    a group destroyed by the reducer's release joins gloo's worker threads with the GIL held, while a
    worker may still need the GIL to release the last collective's tensors (2 of 12 two-process runs
    hung for good; pytorch/pytorch#56297). Released by `destroy_process_group`, the group's binding
    lets go of the GIL first."""
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.free_memory()  # the prepared (wrapped) model, optimizer and dataloader
    trainer.model_wrapped = trainer.model  # as Trainer itself unwraps (`_update_auto_batch_size`)
    trainer.accelerator.end_training()


def loss_curve(out: Path) -> list[list[float]]:
    """[[step, training loss], ...] of a run, one point per `logging_steps` (from logs.jsonl; a
    resumed run logged some steps twice: the last entry of a step wins)."""
    points = {}
    if (out / "logs.jsonl").is_file():
        for entry in read_jsonl(out / "logs.jsonl"):
            if "loss" in entry:
                points[entry["step"]] = entry["loss"]
    return [[step, points[step]] for step in sorted(points)]


def grad_norm_summary(out: Path, max_norm: float) -> dict | None:
    """Median, 90th percentile and largest gradient norm before clipping over a run's steps, and the
    share of steps that clipping at `max_norm` cut (0: no clipping; None where no norms were written)."""
    path = out / GRAD_NORMS_FILE
    if not path.is_file():
        return None
    norms = {}
    for entry in read_jsonl(path):
        norms[entry["step"]] = entry["grad_norm"]  # a resumed run wrote its redone steps again
    values = sorted(norms.values())
    if not values:
        return None
    return {"steps": len(values), "median": values[len(values) // 2], "p90": values[int(0.9 * (len(values) - 1))],
            "max": values[-1], "first": norms[min(norms)], "last": norms[max(norms)],
            "max_grad_norm": max_norm, "clipped_share": sum(v > max_norm for v in values) / len(values) if max_norm > 0 else 0.0}


def _step_of(checkpoint: str | None) -> int:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0


def _save_final(trainer: Trainer, path: Path, tokenizer) -> None:
    """The trained result: an fflora adapter, a PEFT LoRA adapter, or a full model folder."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if has_adapter(model):
        save_adapter(model, path)
    else:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
