"""Adapter methods: what an adapter is, in its training and fused forms, and how it is saved.

One folder per method (`ffba/`, `zflora/`: configuration, layers, fused form, tuner, and the
`Method` that puts them behind one interface, `interface.Method`); what they share here: the common
configuration fields (`config`), training-form helpers (`layers`), the fused GEMMs (`fused`), a fused
model's one inference form (`fused_model.FusedModel`: fuse, unfuse, the bank, plan, compile), the
registry of methods (`registry`), the training-form operations every method supports (`adapters`:
apply, remove), the on-disk format (`adapter_files` reads, `serialization` saves and loads) and PEFT's
tuner interface (`tuner`, `registration`). Below it only `fastpath` (how GEMMs and decode steps run),
models, ops and utils; nothing here imports recipes, serving, bench or the CLI.

The names below are the layer's public face for the layers above it.
"""

# PEFT first: `import fflora` registers FFBA and ZFLORA with PEFT right after PEFT's import
# (`fflora.utils.lazy.when_imported`); imported here, that happens before any module of this
# package starts, so the registration finds each of them whole.
import peft  # noqa: F401

from .adapter_files import BaseModelMismatchError, adapter_folder
from .adapters import adapter_parameters, adapter_state_dict, apply_adapter, has_adapter, parameter_summary, remove_adapter
from .ffba.config import FFBAConfig
from .fused_model import FusedModel, bank_of, compile_decode, fuse, plan_gemms, select_adapters, unfuse
from .layers import BASE_NAME
from .serialization import load_adapter, load_adapter_state, save_adapter
from .zflora.config import ZFLoRAConfig

__all__ = [
    "BASE_NAME",
    "BaseModelMismatchError",
    "FFBAConfig",
    "FusedModel",
    "ZFLoRAConfig",
    "adapter_folder",
    "adapter_parameters",
    "adapter_state_dict",
    "apply_adapter",
    "bank_of",
    "compile_decode",
    "fuse",
    "has_adapter",
    "load_adapter",
    "load_adapter_state",
    "parameter_summary",
    "plan_gemms",
    "remove_adapter",
    "save_adapter",
    "select_adapters",
    "unfuse",
]
