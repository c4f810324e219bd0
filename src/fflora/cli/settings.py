"""Each command's settings from its arguments: `train`, `compare` and `serve` build their settings
objects here, which check themselves, so `main` can run the check before the command's modules
(PyTorch and the rest) load: a bad flag fails in a fraction of a second, not after seconds of imports.
The commands build them again from here (no cost), so the checked settings are the ones that run."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields, replace

from ..recipes.settings import CompareSettings, TrainConfig
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
