"""Open what `fflora train` wrote, whatever the method: an fflora adapter (FFBA or zFLoRA), a PEFT
LoRA adapter, or a full model folder; or a run folder holding one of them under `adapter/`."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from ..methods import fuse, load_adapter
from ..methods.adapter_files import describe
from ..models.base_models import load_base_model
from ..models.catalog import DEFAULT_MODEL


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
