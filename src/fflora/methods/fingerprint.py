"""What identifies a base model: its shape (from its config) and a fingerprint of its weights, saved
with every adapter so that loading it onto another base is caught."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .fused import base_projection_weights
from .fused_state import fused_model_of

SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim")


def base_model_shape(model: nn.Module) -> dict:
    cfg = model.config
    return {k: getattr(cfg, k, None) for k in SHAPE_KEYS}


def base_model_fingerprint(model: nn.Module, samples: int = 4096) -> str:
    """sha256 over the shapes and an evenly strided sample of every base projection and the embeddings.

    Values are rounded to bfloat16 first, so the same base loaded in fp32 or bf16 matches. A model fused
    in a quantized format answers with the fingerprint its weights had before they were quantized.
    """
    state = fused_model_of(model)
    if state is not None and state.fingerprint is not None:
        return state.fingerprint
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
