"""fflora: fused forward-backward adapters (FFBA) for parameter-efficient fine-tuning of LLMs.

Reference implementation of FLoRA (Gowda, Song, Lee, Goka; arXiv 2511.00050). The paper's
equations are not public: the method implemented here is our reading of it, written down in
the README's "The method" section.
"""

from .fastpath.compile import compile_decode
from .fastpath.plan import plan_gemms
from .methods.adapters import (
    apply_adapter,
    apply_ffba,
    fuse,
    parameter_summary,
    print_trainable_parameters,
    remove_adapter,
    remove_ffba,
    unfuse,
)
from .methods.ffba.bank import BASE_NAME, delete_adapter, list_adapters, select_adapters
from .methods.ffba.config import FFBAConfig
from .methods.ffba.method import ffba_parameter_count
from .methods.ffba.tuner import FFBAModel
from .methods.registration import register
from .methods.serialization import BaseModelMismatchError, BaseModelMismatchWarning, load_adapter, save_adapter
from .methods.zflora.config import ZFLoRAConfig
from .methods.zflora.method import zflora_parameter_count
from .methods.zflora.tuner import ZFLoRAModel
from .models.base_models import load_base_model
from .recipes.budget import lora_parameter_count
from .utils.version import __version__

register()  # FFBA and ZFLORA in PEFT's registries: get_peft_model, PeftModel.from_pretrained

__all__ = [
    "BASE_NAME",
    "BaseModelMismatchError",
    "BaseModelMismatchWarning",
    "FFBAConfig",
    "FFBAModel",
    "ZFLoRAConfig",
    "ZFLoRAModel",
    "apply_adapter",
    "apply_ffba",
    "compile_decode",
    "delete_adapter",
    "ffba_parameter_count",
    "fuse",
    "list_adapters",
    "load_adapter",
    "load_base_model",
    "lora_parameter_count",
    "parameter_summary",
    "plan_gemms",
    "print_trainable_parameters",
    "remove_adapter",
    "remove_ffba",
    "save_adapter",
    "select_adapters",
    "unfuse",
    "zflora_parameter_count",
]
