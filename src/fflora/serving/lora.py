"""PEFT LoRA adapters in `fflora serve`: each merged into a copy of the base weights of its own and
served by an engine of its own, under its own model name, beside the FFBA bank.

A LoRA update is no row or column of the base GEMMs, so it cannot join the bank, and PEFT's unmerged
LoRA in the same batch would slow every FFBA request. Merged, a LoRA model decodes at the base
model's speed, for one more copy of the weights and a KV cache of its own; an idle LoRA engine
costs the FFBA requests nothing. This is how a user A/B-tests FFBA against LoRA behind one API.
"""

from __future__ import annotations

import copy
import os

from peft import PeftModel
from torch import nn

from ..methods import FusedModel
from ..methods.adapter_files import describe


def is_lora(path: str | os.PathLike) -> bool:
    """Whether `path` (an adapter folder, or the run folder `fflora train` wrote) holds a PEFT LoRA adapter
    (False where it holds nothing trained: the bank's loader says what is wrong)."""
    try:
        return describe(path)["kind"] == "lora"
    except FileNotFoundError:
        return False


def merged_lora(base: nn.Module, path: str | os.PathLike, weights: str | None = None) -> FusedModel:
    """A fused copy of the plain (unfused) `base` with the LoRA adapter at `path` merged into its weights,
    with a bank of one empty slot (what the engine serves from)."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), describe(path)["path"]).merge_and_unload()
    return FusedModel.build(model.eval(), max_adapters=1, weights=weights)
