"""Each command's settings from its arguments: `train`, `compare` and `serve` build their settings
objects here, which check themselves, and `eval` and `generate` check what they are asked for, so
`main` can run the check before the command's modules (PyTorch and the rest) load: a bad flag fails
in a fraction of a second, not after seconds of imports.
The commands build them again from here (no cost), so the checked settings are the ones that run."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields, replace

from ..recipes.settings import CompareSettings, TrainConfig, check_evaluation
from ..serving.config import ServerConfig


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run `fflora train` (or `compare`, for its first method) describes."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def compare_settings(args: argparse.Namespace) -> tuple[TrainConfig, CompareSettings]:
    """`fflora compare`'s recipe (the first method's run; a built-in task holds out 200 records, as the
    comparison is their NLL) and its settings."""
    settings = CompareSettings(methods=tuple(args.methods), latency=not args.no_latency, prompt_len=args.prompt_len,
                               new_tokens=args.new_tokens, repeats=args.repeats, compile=args.compile)
    recipe = train_config(argparse.Namespace(**vars(args), method=settings.methods[0]))
    if recipe.dev_size == 0 and recipe.task:
        recipe = replace(recipe, dev_size=200)
    return recipe, settings


def eval_settings(args: argparse.Namespace) -> None:
    """`fflora eval`'s request, checked: one model, sizes of at least 1, and the data sets --task names
    scorable by --mode (and --engine, which decodes --mode generate only)."""
    if args.adapter and args.method == "base":
        raise ValueError("give either --adapter DIR or --method base, not both")
    for name in ("limit", "batch_size", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.dev_size is not None and args.dev_size < 0:
        raise ValueError(f"--dev-size must be >= 0, got {args.dev_size}")
    if args.task:
        check_evaluation(args.task, args.mode, args.engine)


def generate_settings(args: argparse.Namespace) -> None:
    """`fflora generate`'s request, checked: tokens to generate, a temperature, the fast path's flags on
    the fused form only."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.unfused and (args.gemm_plan != "standard" or args.compile != "off" or args.weights):
        raise ValueError("--gemm-plan, --compile and --weights apply to the fused form; drop --unfused, or them")


def server_config(args: argparse.Namespace) -> ServerConfig:
    """`fflora serve`'s settings: --adapter NAME=PATH pairs, API keys (or $FFLORA_API_KEY), the rest as given."""
    adapters = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=PATH, got {spec!r}")
        if name in adapters:
            raise ValueError(f"--adapter {name!r} is given twice")
        adapters[name] = path
    options = {f.name for f in fields(ServerConfig)} - {"adapters", "api_keys", "adapter_roots", "allowed_hosts"}
    return ServerConfig(adapters=adapters, api_keys=args.api_key or [k for k in [os.environ.get("FFLORA_API_KEY", "")] if k],
                        adapter_roots=args.adapter_root, allowed_hosts=args.allowed_host or None,
                        **{name: getattr(args, name) for name in options})
