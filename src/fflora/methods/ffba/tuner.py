"""FFBA's PEFT tuner: `get_peft_model(model, FFBAConfig(...))` builds FFBA through it."""

from __future__ import annotations

from ..tuner import AdapterTuner
from .config import FFBAConfig


class FFBAModel(AdapterTuner):
    """PEFT's tuner for FFBA (peft_type "FFBA")."""

    prefix = "ffba"
    config_cls = FFBAConfig
