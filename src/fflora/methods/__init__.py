"""Adapter methods: what an adapter is, in its training and fused forms, and how it is saved.

One folder per method (`ffba/`, `zflora/`: configuration, layers, fused form, tuner, and the
`Method` that puts them behind one interface, `interface.Method`); what they share here: the common
configuration fields (`config`), training-form helpers (`layers`), the fused GEMMs (`fused`), a fused
model's state (`fused_state`), the registry of methods (`registry`), the operations every method
supports (`adapters`: apply, remove, fuse, unfuse), the on-disk format (`serialization`) and PEFT's
tuner interface (`tuner`, `registration`). Nothing here imports fastpath, recipes, serving, bench
or the CLI.

The names below are the layer's public face for the layers above it.
"""

# PEFT first: `import fflora` registers FFBA and ZFLORA with PEFT right after PEFT's import
# (`fflora.utils.lazy.when_imported`); imported here, that happens before any module of this
# package starts, so the registration finds each of them whole.
import peft  # noqa: F401

from .adapters import (
    adapter_parameters,
    adapter_state_dict,
    apply_adapter,
    fuse,
    has_adapter,
    parameter_summary,
    remove_adapter,
    unfuse,
)
from .ffba.bank import BASE_NAME, bank_of, select_adapters
from .ffba.config import FFBAConfig
from .serialization import load_adapter, load_adapter_state, save_adapter
from .zflora.config import ZFLoRAConfig

__all__ = [
    "BASE_NAME",
    "FFBAConfig",
    "ZFLoRAConfig",
    "adapter_parameters",
    "adapter_state_dict",
    "apply_adapter",
    "bank_of",
    "fuse",
    "has_adapter",
    "load_adapter",
    "load_adapter_state",
    "parameter_summary",
    "remove_adapter",
    "save_adapter",
    "select_adapters",
    "unfuse",
]
