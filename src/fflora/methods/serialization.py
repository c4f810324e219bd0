"""Save and load FFBA and zFLoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

The same files as `PeftModel.save_pretrained` writes for these methods (the config with peft_type "FFBA" or
"ZFLORA"; tensors under PEFT's names, `base_model.model.<parameter name>`), so either library loads what
the other saved. `save_adapter` adds, in the safetensors metadata where PEFT ignores it, the base
model's shape and a fingerprint of its weights, which reading checks (`adapter_files`). Adapters in
fflora 0.1.0's own format (`adapter.safetensors`, a "format" key in the config) still load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn

from ..utils.files import atomic_write, atomic_write_text
from ..utils.version import __version__
from . import registry
from .adapter_files import BASE_MODEL_KEY, CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, adapter_folder, read_checked
from .adapters import adapter_parameters, apply_adapter, has_adapter, remove_adapter
from .fingerprint import base_model_fingerprint, base_model_shape
from .fused_model import DEFAULT_MAX_ADAPTERS, FusedModel, refresh_fused_weights

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
    fused = FusedModel.of(model)
    if fused is not None and fused.bank is not None:
        raise ValueError("this model has an adapter bank; load adapters into it with adapter_name=...")
    target = without_peft_wrapper(model)  # a PeftModel (e.g. a Trainer's, resuming) loads onto its model
    config, state = read_checked(target, path, strict)
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
    fused = FusedModel.of(model)
    if (fused is None or fused.bank is None) and (has_adapter(model) or fused is not None):
        carried = registry.method_of(model)
        raise ValueError(f"this model carries a single {carried.title + ' ' if carried else ''}adapter (or is fused without "
                         "a bank); load named adapters onto a plain base model or one fused with "
                         "fflora.fuse(model, max_adapters=K)")
    if fused is not None:
        fused.load(adapter_name, path, strict)
        return model
    fused = FusedModel.build(model, max_adapters=DEFAULT_MAX_ADAPTERS)
    try:
        fused.load(adapter_name, path, strict)
    except BaseException:
        fused.unfuse()  # the plain base model again
        raise
    return model


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
