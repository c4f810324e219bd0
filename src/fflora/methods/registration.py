"""FFBA and zFLoRA in PEFT's registries, so that `get_peft_model` and `PeftModel.from_pretrained` know them.

`register()` (called by `import fflora`) uses PEFT's `register_peft_method` where it accepts the name,
else writes the three registries under plain string keys (`PeftType` is a str enum, so "FFBA" looks up
like a member). Tested with peft 0.21.2 (constraints.txt; pyproject pins the range).
"""

from __future__ import annotations

import warnings

from peft import mapping
from peft.utils import register_peft_method

from . import registry
from .tuner import tuner_for


def register() -> None:
    """Make every registered method (FFBA, zFLoRA) a PEFT method (idempotent)."""
    for model_cls in map(tuner_for, registry.METHODS):
        config_cls = model_cls.config_cls
        peft_type = config_cls.PEFT_TYPE
        if mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
            continue
        try:
            register_peft_method(name=peft_type.lower(), config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
        except ValueError:  # "Unknown PEFT type": PEFT's enum lists only its own methods
            mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
            mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
            mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix
        except KeyError as e:  # another package registered the name first
            warnings.warn(f"PEFT already has a method {peft_type!r} ({e}); fflora's {config_cls.__name__} is not registered")
