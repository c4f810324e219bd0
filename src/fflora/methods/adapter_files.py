"""Reading an fflora adapter folder: where it is, its configuration and weights, checked against the model.

The files are PEFT's (`adapter_config.json` with peft_type "FFBA" or "ZFLORA", `adapter_model.safetensors`
under PEFT's names) plus, in the safetensors metadata, the base model's shape and a fingerprint of its
weights (`serialization.save_adapter` writes them): reading for another architecture or shape fails,
for a base with other weights warns (or fails when strict). fflora 0.1.0's own files still read.
Loading what is read into a model is `serialization` (one adapter) or `FusedModel.load` (a bank).
`describe` says what any trained folder holds (an fflora adapter, a PEFT LoRA adapter, a full model, or a
run folder of `fflora train` with one of them under `adapter/`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from torch import nn

from ..models.architectures import architecture_of
from . import registry
from .fingerprint import SHAPE_KEYS, base_model_fingerprint, base_model_shape
from .interface import Method

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = SAFETENSORS_WEIGHTS_NAME  # adapter_model.safetensors
PEFT_PREFIX = "base_model.model."  # PEFT's prefix of every saved tensor name
BASE_MODEL_KEY = "fflora_base_model"  # safetensors metadata: the base model's shape, name and fingerprint
# fflora 0.1.0's own format: a "format" key naming the method (`Method.legacy_format`), the configuration
# under the method's name, the weights in this file under canonical keys.
LEGACY_WEIGHTS_NAME = "adapter.safetensors"


class BaseModelMismatchWarning(UserWarning):
    """The adapter was saved for a base of the same shape but other weights."""


class BaseModelMismatchError(ValueError):
    """As BaseModelMismatchWarning, raised instead where loading is strict."""


RUN_ADAPTER = "adapter"  # where `fflora train` writes a run's adapter, inside the run folder
RUN_FILE = "run.json"  # what `fflora train` records of a run (its configuration, losses, timing), in the run folder


def adapter_folder(path: str | os.PathLike) -> Path:
    """The adapter folder `path` names: `path` itself, or the `adapter/` inside the run folder that
    `fflora train` wrote. Everything that takes an adapter takes either (one rule for every command)."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() and (path / RUN_ADAPTER / CONFIG_NAME).is_file():
        return path / RUN_ADAPTER
    return path


def describe(path: str | Path) -> dict:
    """{"kind": "ffba" | "zflora" | "lora" | "full", "path": folder, "base": base model or None} of a trained result."""
    path = Path(path)
    if (path / RUN_ADAPTER).is_dir():
        run = json.loads((path / RUN_FILE).read_text()) if (path / RUN_FILE).is_file() else {}
        found = describe(path / RUN_ADAPTER)
        return {**found, "base": found["base"] or run.get("config", {}).get("model")}
    config = path / CONFIG_NAME
    if config.is_file():
        meta = json.loads(config.read_text())
        method = adapter_method(meta)
        if method is not None:
            base = meta.get("base_model_name_or_path") if "peft_type" in meta else meta["base_model"].get("name_or_path")
            return {"kind": method.name, "path": path, "base": base}
        if "peft_type" in meta:
            return {"kind": "lora", "path": path, "base": meta.get("base_model_name_or_path")}
    if (path / "config.json").is_file():
        return {"kind": "full", "path": path, "base": None}
    raise FileNotFoundError(
        f"{path} holds no trained result: expected an fflora adapter ({CONFIG_NAME}), a PEFT adapter, "
        "a model folder (config.json) or a run folder with adapter/ inside"
    )


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The parsed adapter_config.json of an fflora adapter folder (PEFT's format or fflora 0.1.0's), with
    clear errors for missing or corrupt files and for adapters of other methods."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no fflora adapter at {path}: {CONFIG_NAME} is missing (save one with fflora.save_adapter)")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is corrupt (not valid JSON: {e}); save the adapter again") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{file} is not an adapter config (a JSON object with peft_type {_peft_types()})")
    if meta.get("peft_type") is not None and registry.by_peft_type(meta["peft_type"]) is None:
        raise ValueError(
            f"the adapter at {path} is a PEFT {meta['peft_type']} adapter, not FFBA or zFLoRA: load it with "
            f"peft.PeftModel.from_pretrained(base_model, {str(path)!r})"
        )
    if meta.get("peft_type") is None and registry.by_legacy_format(meta.get("format")) is None:
        raise ValueError(f"{file} is not an fflora adapter config (expected peft_type {_peft_types()})")
    return meta


def _peft_types() -> str:
    return " or ".join(repr(m.peft_type) for m in registry.METHODS)


def adapter_method(meta: dict) -> Method | None:
    """The method of a parsed adapter config (PEFT's format or fflora 0.1.0's), or None if it is not
    an fflora adapter's."""
    if meta.get("peft_type") is not None:
        return registry.by_peft_type(meta["peft_type"])
    return registry.by_legacy_format(meta.get("format"))


def config_of(meta: dict) -> tuple[Method, object]:
    """The method and configuration a parsed adapter config (`read_adapter_config`) describes."""
    method = adapter_method(meta)
    return method, method.config_class.from_dict(meta if meta.get("peft_type") is not None else meta[method.name])


def read_checked(model: nn.Module, path, strict: bool) -> tuple[object, dict[str, torch.Tensor]]:
    """The configuration and weights (canonical keys) of the adapter at `path`, after checking that it was
    saved for this architecture and shape (ValueError) and for these base weights (warning, or ValueError
    if strict). An adapter that PEFT saved carries no record of its base: only its tensor shapes are checked."""
    meta = read_adapter_config(path)
    architecture_of(model)
    method, config = config_of(meta)
    if meta.get("peft_type") is not None:
        state, metadata = read_weights(Path(path) / WEIGHTS_NAME, method)
        saved_base = json.loads(metadata[BASE_MODEL_KEY]) if BASE_MODEL_KEY in metadata else None
    else:
        state, _ = read_weights(Path(path) / LEGACY_WEIGHTS_NAME)
        saved_base = meta.get("base_model", {})
    if saved_base is not None:
        _check_base(model, path, saved_base, strict)
    return config, state


def _check_base(model: nn.Module, path, saved_base: dict, strict: bool) -> None:
    this_base = base_model_shape(model)
    diffs = [f"{k}: adapter {saved_base.get(k)!r}, model {this_base[k]!r}" for k in SHAPE_KEYS if saved_base.get(k) != this_base[k]]
    if diffs:
        saved_name = saved_base.get("name_or_path")
        raise ValueError(
            f"the adapter at {path} was saved for another base model"
            + (f", {saved_name!r}" if saved_name else " (its name was not recorded)")
            + f": its shape differs from this model's ({'; '.join(diffs)}). Load it onto the model it was trained on"
            + (f" (--model {saved_name})" if saved_name else "")
        )
    if saved_base.get("fingerprint") != base_model_fingerprint(model):
        saved_name, this_name = saved_base.get("name_or_path"), getattr(model.config, "_name_or_path", None)
        if saved_name and saved_name == this_name:
            base = f"other weights of {saved_name!r} than this model's (same name: another conversion, revision or fine-tune)"
        else:
            base = ((f"{saved_name!r}, " if saved_name else "") + "a base model with other weights than this one"
                    + (f" ({this_name!r})" if this_name else ""))
        message = (f"the adapter at {path} was trained on {base}; its outputs here will not be what was trained. "
                   "Load it onto the base it was trained on")
        if strict:
            raise BaseModelMismatchError(message + " (strict=True)")
        warnings.warn(message, BaseModelMismatchWarning, stacklevel=4)


def read_weights(file: Path, method: Method | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors under canonical keys, safetensors metadata) of an adapter's weights file: PEFT's names are
    mapped by `method`; without one (fflora 0.1.0's file) they are canonical already."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; save the adapter again with fflora.save_adapter")
    try:
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file} is truncated or corrupt ({e}); save the adapter again") from e
    if method is None:
        return tensors, metadata
    state = {}
    for name, tensor in tensors.items():
        key = method.canonical_key(name)
        if key is None or key in state:
            raise ValueError(f"{file} holds a tensor {name!r} that is not one of a {method.title} adapter's; "
                             "the file is corrupt or was edited, save the adapter again")
        state[key] = tensor
    return state, metadata
