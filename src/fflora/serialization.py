"""Save and load FFBA and zFLoRA adapters: `adapter_config.json` + `adapter.safetensors`.

The config records the adapter family and configuration, the base model's shape and a fingerprint of its
weights, so that loading onto another architecture or shape fails and loading onto a base with
other weights warns (or fails with strict=True).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .architectures import architecture_of
from .config import FFBAConfig, ZFLoRAConfig
from .files import atomic_write, atomic_write_text
from .fused import base_projection_weights, refresh_adapter_weights, unfuse
from .model import apply_ffba, has_ffba, remove_ffba, sub_block_adapters
from .zflora import is_zflora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "fflora-ffba/1"
ZFLORA_FORMAT = "fflora-zflora/1"
# format -> (key of the configuration in adapter_config.json, configuration class)
FAMILIES = {FORMAT: ("ffba", FFBAConfig), ZFLORA_FORMAT: ("zflora", ZFLoRAConfig)}
ADAPTER_PARAMS = ("fa_down", "fa_up", "ba_down", "ba_up")
_SHAPE_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim",
)


class BaseModelMismatchWarning(UserWarning):
    """The adapter was saved for a base of the same shape but other weights."""


def base_model_shape(model: nn.Module) -> dict:
    cfg = model.config
    return {k: getattr(cfg, k, None) for k in _SHAPE_KEYS}


def base_model_fingerprint(model: nn.Module, samples: int = 4096) -> str:
    """sha256 over the shapes and an evenly strided sample of every base projection and the embeddings.

    Values are rounded to bfloat16 first, so the same base loaded in fp32 or bf16 matches.
    """
    digest = hashlib.sha256()
    weights = [("embed_tokens", model.get_input_embeddings().weight), *base_projection_weights(model)]
    for name, weight in weights:
        flat = weight.detach().reshape(-1)
        count = min(samples, flat.numel())
        # Integer arithmetic: float linspace rounds past the end for tensors of ~1e7 elements.
        index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        sample = flat[index].to(torch.bfloat16).float().cpu().numpy()
        digest.update(f"{name}:{tuple(weight.shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The live adapter parameters under canonical keys: `layers.{i}.{attn|mlp}.{fa_down|fa_up|ba_down|ba_up}`
    for FFBA, `layers.{i}.{attn|mlp}.{z_in|z_out}` and `head.z_merge` for zFLoRA."""
    if is_zflora(model):
        from .zflora.model import zflora_adapter_parameters

        return zflora_adapter_parameters(model)
    params = {}
    for i, adapter in sub_block_adapters(model):
        for name in ADAPTER_PARAMS:
            tensor = getattr(adapter, name)
            if tensor is not None:
                params[f"layers.{i}.{adapter.name}.{name}"] = tensor
    return params


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the adapter parameters, under their canonical keys."""
    return {k: v.detach().contiguous().cpu() for k, v in adapter_parameters(model).items()}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's adapter to folder `path` (created if needed); each file is replaced atomically."""
    if not has_ffba(model):
        raise ValueError("this model has no adapter to save; call fflora.apply_adapter first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fmt = ZFLORA_FORMAT if is_zflora(model) else FORMAT
    meta = {
        "format": fmt,
        "fflora_version": __version__,
        FAMILIES[fmt][0]: model.ffba_config.to_dict(),
        "base_model": {
            **base_model_shape(model),
            "name_or_path": getattr(model.config, "_name_or_path", None),
            "fingerprint": base_model_fingerprint(model),
        },
    }
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(adapter_state_dict(model), tmp, metadata={"format": fmt}))
    atomic_write_text(path / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return path


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The parsed adapter_config.json of an adapter folder, with clear errors for missing/corrupt files."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no fflora adapter at {path}: {CONFIG_NAME} is missing (save one with fflora.save_adapter)")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is corrupt (not valid JSON: {e}); save the adapter again") from e
    if not isinstance(meta, dict) or meta.get("format") not in FAMILIES:
        raise ValueError(f"{file} is not an fflora adapter config (expected format {FORMAT!r} or {ZFLORA_FORMAT!r})")
    return meta


def load_adapter(model: nn.Module, path: str | os.PathLike, strict: bool = False, adapter_name: str | None = None) -> nn.Module:
    """Load the adapter in folder `path` onto `model` and return it.

    Without `adapter_name`: `model` is a base model (FFBA is applied with the saved configuration)
    or a model that already carries an adapter of the same configuration (its weights are
    replaced; in a fused model only the adapter rows/columns are rewritten).

    With `adapter_name`: the adapter joins the model's adapter bank under that name (a plain base
    model is first fused with a bank of `fflora.bank.DEFAULT_MAX_ADAPTERS` adapters; call
    `fflora.fuse(model, max_adapters=K)` first for another size). Only its rows/columns are
    written; adapters of any rank and FA/BA setting share the bank.

    Raises ValueError when the adapter was saved for another architecture or shape, or its files
    are corrupt, leaving the model (and its bank) unchanged. When the base weights differ from
    those the adapter was trained on, warns, or raises ValueError if `strict`.
    """
    if adapter_name is not None:
        return _load_into_bank(model, path, strict, adapter_name)
    if getattr(model, "ffba_bank", None) is not None:
        raise ValueError("this model has an adapter bank; load adapters into it with adapter_name=...")
    config, state = _read_checked(model, path, strict)
    applied_here = not has_ffba(model)
    if applied_here:
        apply_ffba(model, config)
    elif model.ffba_config != config:
        raise ValueError(
            f"the model carries an adapter with another configuration ({model.ffba_config}) than the one "
            f"at {path} ({config}); load it onto a fresh base model"
        )
    try:
        load_adapter_state(model, state, source=path)
    except ValueError:
        if applied_here:
            remove_ffba(model)
        raise
    return model


def _load_into_bank(model: nn.Module, path, strict: bool, adapter_name: str) -> nn.Module:
    from .bank import DEFAULT_MAX_ADAPTERS, fuse_with_bank

    bank = getattr(model, "ffba_bank", None)
    if bank is None and (has_ffba(model) or getattr(model, "ffba_fused", False)):
        raise ValueError("this model carries a single FFBA adapter (or is fused without a bank); load named "
                         "adapters onto a plain base model or one fused with fflora.fuse(model, max_adapters=K)")
    if bank is not None:
        bank.check_new_name(adapter_name)  # before reading any file
    config, state = _read_checked(model, path, strict)
    if isinstance(config, ZFLoRAConfig):
        raise ValueError(f"the adapter at {path} is a zFLoRA adapter; an adapter bank holds FFBA adapters only. "
                         "Load it without adapter_name")
    fused_here = bank is None
    if fused_here:
        fuse_with_bank(model, DEFAULT_MAX_ADAPTERS)
    try:
        model.ffba_bank.add(adapter_name, config, state, source=str(path))
    except ValueError:
        if fused_here:
            unfuse(model)
        raise
    return model


def _read_checked(model: nn.Module, path, strict: bool) -> tuple[FFBAConfig | ZFLoRAConfig, dict[str, torch.Tensor]]:
    """The configuration and weights of the adapter at `path`, after checking that it was saved for
    this architecture and shape (ValueError) and for these base weights (warning, or ValueError if strict)."""
    meta = read_adapter_config(path)
    architecture_of(model)
    saved_base = meta.get("base_model", {})
    this_base = base_model_shape(model)
    diffs = [f"{k}: adapter {saved_base.get(k)!r}, model {this_base[k]!r}" for k in _SHAPE_KEYS if saved_base.get(k) != this_base[k]]
    if diffs:
        raise ValueError(
            f"the adapter at {path} was saved for another base model ({saved_base.get('name_or_path')!r}); "
            "load it onto that model. Differences: " + "; ".join(diffs)
        )
    key, config_class = FAMILIES[meta["format"]]
    config = config_class.from_dict(meta[key])
    state = _read_weights(Path(path) / WEIGHTS_NAME)
    fingerprint = base_model_fingerprint(model)
    if saved_base.get("fingerprint") != fingerprint:
        message = (
            f"the adapter at {path} was trained on a base model with other weights "
            f"({saved_base.get('name_or_path')!r}) than this one ({getattr(model.config, '_name_or_path', None)!r}); "
            "its outputs will not be what was trained"
        )
        if strict:
            raise ValueError(message + " (strict=True)")
        warnings.warn(message, BaseModelMismatchWarning, stacklevel=3)
    return config, state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source="the given state dict") -> None:
    """Replace the adapter weights of a model carrying FFBA adapters, in place.

    `state` uses the canonical keys of `adapter_state_dict`. In a fused model only the adapter
    rows/columns of the fused matrices are rewritten; the base weights are not touched or copied.
    """
    _copy_into(model, state, source)
    if getattr(model, "ffba_fused", False):
        refresh_adapter_weights(model)


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; save the adapter again with fflora.save_adapter")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file} is truncated or corrupt ({e}); save the adapter again") from e


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
