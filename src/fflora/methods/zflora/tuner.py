"""zFLoRA's PEFT tuner: `get_peft_model(model, ZFLoRAConfig(...))` builds zFLoRA through it."""

from __future__ import annotations

from ..tuner import tuner_for
from .method import METHOD

ZFLoRAModel = tuner_for(METHOD)
