"""Open what `fflora train` wrote, whatever the method: an fflora adapter (FFBA or zFLoRA), a PEFT
LoRA adapter, or a full model folder; or a run folder holding one of them under `adapter/`."""

from __future__ import annotations

import json
from pathlib import Path

from peft import PeftModel

from ..methods import fuse, load_adapter
from ..methods.adapter_files import CONFIG_NAME, RUN_ADAPTER, adapter_method
from ..models.base_models import load_base_model
from ..models.catalog import DEFAULT_MODEL

RUN_FILE = "run.json"


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


def load_trained(path: str | Path, base_model: str | None = None, fused: bool = True, strict: bool = False):
    """(model, tokenizer, kind) ready for inference; fflora adapters come fused unless fused=False."""
    found = describe(path)
    if found["kind"] == "full":
        model, tokenizer = load_base_model(found["path"])
        return model, tokenizer, "full"
    base = base_model or _known_base(found["base"])
    model, tokenizer = load_base_model(base)
    if found["kind"] not in ("lora", "full"):  # an fflora method's adapter
        load_adapter(model, found["path"], strict=strict)
        if fused:
            fuse(model)
        return model.eval(), tokenizer, found["kind"]
    return PeftModel.from_pretrained(model, found["path"]).eval(), tokenizer, "lora"


def _known_base(name: str | None) -> str | None:
    """The base recorded with an adapter; the embedded default's name maps back to None (default)."""
    return None if name in (None, DEFAULT_MODEL) else name
