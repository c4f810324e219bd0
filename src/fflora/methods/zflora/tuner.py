"""zFLoRA's PEFT tuner: `get_peft_model(model, ZFLoRAConfig(...))` builds zFLoRA through it."""

from __future__ import annotations

from ..tuner import AdapterTuner
from .config import ZFLoRAConfig


class ZFLoRAModel(AdapterTuner):
    """PEFT's tuner for zFLoRA (peft_type "ZFLORA")."""

    prefix = "z_"  # its parameters: z_in, z_out, and the head's z_merge
    config_cls = ZFLoRAConfig
