"""FFBA's PEFT tuner: `get_peft_model(model, FFBAConfig(...))` builds FFBA through it."""

from __future__ import annotations

from ..tuner import tuner_for
from .method import METHOD

FFBAModel = tuner_for(METHOD)
