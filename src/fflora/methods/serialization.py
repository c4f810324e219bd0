"""Save and load FFBA and zFLoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

The same files as `PeftModel.save_pretrained` writes for these methods (the config with peft_type "FFBA" or
"ZFLORA"; tensors under PEFT's names, `base_model.model.<parameter name>`), so either library loads what
the other saved. `save_adapter` adds, in the safetensors metadata where PEFT ignores it, the base
model's shape and a fingerprint of its weights: loading onto another architecture or shape fails, onto
a base with other weights warns (or fails with strict=True). Adapters in fflora 0.1.0's own format
(`adapter.safetensors`, a "format" key in the config) still load.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..models.architectures import architecture_of
from ..utils.files import atomic_write, atomic_write_text
from ..utils.version import __version__
from . import registry
from .adapters import (DEFAULT_MAX_ADAPTERS, adapter_parameters, apply_adapter, fuse, has_adapter,
                       refresh_fused_weights, remove_adapter, unfuse)
from .fingerprint import SHAPE_KEYS, base_model_fingerprint, base_model_shape
from .fused_state import fused_state
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


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's adapter to folder `path` (created if needed) in PEFT's format; each file is
    replaced atomically. `peft.PeftModel.from_pretrained(base, path)` loads it as well."""
    model = without_peft_wrapper(model)
    config = registry.adapter_config(model)
    if config is None:
        raise ValueError("this model has no adapter to save; call fflora.apply_adapter first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = type(config).from_dict(config.to_dict())
    config.base_model_name_or_path = getattr(model.config, "_name_or_path", None) or None
    config.inference_mode = True  # as PEFT saves it
    base = {**base_model_shape(model), "name_or_path": config.base_model_name_or_path,
            "fingerprint": base_model_fingerprint(model)}
    metadata = {"format": "pt", "fflora_version": __version__, BASE_MODEL_KEY: json.dumps(base)}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(peft_state_dict(model), tmp, metadata=metadata))
    atomic_write_text(path / CONFIG_NAME, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def without_peft_wrapper(model: nn.Module) -> nn.Module:
    """The transformers model inside a `PeftModel` (the adapter stays on it), or `model` itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (detached CPU copies) under PEFT's names: `base_model.model.<parameter name>`."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    return {PEFT_PREFIX + names[id(p)]: p.detach().contiguous().cpu() for p in adapter_parameters(model).values()}


RUN_ADAPTER = "adapter"  # where `fflora train` writes a run's adapter, inside the run folder


def adapter_folder(path: str | os.PathLike) -> Path:
    """The adapter folder `path` names: `path` itself, or the `adapter/` inside the run folder that
    `fflora train` wrote. Everything that takes an adapter takes either (one rule for every command)."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() and (path / RUN_ADAPTER / CONFIG_NAME).is_file():
        return path / RUN_ADAPTER
    return path


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


def load_adapter(model: nn.Module, path: str | os.PathLike, strict: bool = False, adapter_name: str | None = None) -> nn.Module:
    """Load the adapter in folder `path` (or in the run folder `path` that `fflora train` wrote) onto
    `model` and return it.

    Without `adapter_name`: `model` is a base model (FFBA is applied with the saved configuration)
    or a model that already carries an adapter of the same configuration (its weights are
    replaced; in a fused model only the adapter rows/columns are rewritten).

    With `adapter_name`: the adapter joins the model's adapter bank under that name (a plain base
    model is first fused with a bank of `fflora.methods.ffba.bank.DEFAULT_MAX_ADAPTERS` adapters; call
    `fflora.fuse(model, max_adapters=K)` first for another size). Only its rows/columns are
    written; adapters of any rank and FA/BA setting share the bank.

    Raises ValueError when the adapter was saved for another architecture or shape, or its files
    are corrupt, leaving the model (and its bank) unchanged. When the base weights differ from
    those the adapter was trained on, warns, or raises ValueError if `strict`.
    """
    path = adapter_folder(path)
    if adapter_name is not None:
        return _load_into_bank(model, path, strict, adapter_name)
    state = fused_state(model)
    if state is not None and state.bank is not None:
        raise ValueError("this model has an adapter bank; load adapters into it with adapter_name=...")
    target = without_peft_wrapper(model)  # a PeftModel (e.g. a Trainer's, resuming) loads onto its model
    config, state = _read_checked(target, path, strict)
    carried = registry.adapter_config(target)
    applied_here = carried is None
    if applied_here:
        apply_adapter(target, config)
    elif not carried.same_adapter(config):
        raise ValueError(
            f"the model carries an adapter with another configuration ({carried}) than the one "
            f"at {path} ({config}); load it onto a fresh base model"
        )
    try:
        load_adapter_state(target, state, source=path)
    except ValueError:
        if applied_here:
            remove_adapter(target)
        raise
    return model


def _load_into_bank(model: nn.Module, path, strict: bool, adapter_name: str) -> nn.Module:
    state = fused_state(model)
    bank = None if state is None else state.bank
    if bank is None and (has_adapter(model) or state is not None):
        carried = registry.method_of(model)
        raise ValueError(f"this model carries a single {carried.title + ' ' if carried else ''}adapter (or is fused without "
                         "a bank); load named adapters onto a plain base model or one fused with "
                         "fflora.fuse(model, max_adapters=K)")
    if bank is not None:
        bank.check_new_name(adapter_name)  # before reading any file
    config, weights = _read_checked(model, path, strict)
    method, bank_method = registry.for_config(config), registry.bank_method()
    if method is not bank_method:
        raise ValueError(f"the adapter at {path} is a {method.title} adapter; an adapter bank holds {bank_method.title} "
                         "adapters only. Load it without adapter_name")
    fused_here = bank is None
    if fused_here:
        fuse(model, max_adapters=DEFAULT_MAX_ADAPTERS)
    try:
        fused_state(model).bank.add(adapter_name, config, weights, source=str(path))
    except ValueError:
        if fused_here:
            unfuse(model)
        raise
    return model


def _read_checked(model: nn.Module, path, strict: bool) -> tuple[object, dict[str, torch.Tensor]]:
    """The configuration and weights (canonical keys) of the adapter at `path`, after checking that it was
    saved for this architecture and shape (ValueError) and for these base weights (warning, or ValueError
    if strict). An adapter that PEFT saved carries no record of its base: only its tensor shapes are checked."""
    meta = read_adapter_config(path)
    architecture_of(model)
    method = adapter_method(meta)
    if meta.get("peft_type") is not None:
        config = method.config_class.from_dict(meta)
        state, metadata = _read_weights(Path(path) / WEIGHTS_NAME, method)
        saved_base = json.loads(metadata[BASE_MODEL_KEY]) if BASE_MODEL_KEY in metadata else None
    else:
        config = method.config_class.from_dict(meta[method.name])
        state, _ = _read_weights(Path(path) / LEGACY_WEIGHTS_NAME)
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


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source="the given state dict") -> None:
    """Replace the adapter weights of a model carrying an adapter, in place.

    `state` uses the canonical keys of `adapter_state_dict`. In a fused model only the adapter
    rows/columns of the fused matrices are rewritten; the base weights are not touched or copied.
    """
    method = registry.method_of(model)
    if method is None:
        raise ValueError("this model carries no adapter to load weights into; use fflora.load_adapter(model, path), "
                         "or fflora.apply_adapter(model, config) first")
    ignored = method.ignored_keys(model)
    _copy_into(model, {k: v for k, v in state.items() if k not in ignored}, source)
    refresh_fused_weights(model)


def _read_weights(file: Path, method: Method | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def _copy_into(model: nn.Module, state: dict[str, torch.Tensor], source) -> None:
    params = adapter_parameters(model)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"the adapter weights at {source} do not match their config: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}; the file is corrupt or was edited, save the adapter again"
        )
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(p.shape)}" for k, p in params.items() if state[k].shape != p.shape]
    if wrong:
        raise ValueError(f"the adapter weights at {source} have wrong shapes ({'; '.join(wrong[:4])}); save the adapter again")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key])
