"""fflora: fused forward-backward adapters (FFBA) for parameter-efficient fine-tuning of LLMs.

Reference implementation of FLoRA (Gowda, Song, Lee, Goka; arXiv 2511.00050). The paper's
equations are not public: the method implemented here is our reading of it, written down in
the README's "The method" section.
"""

__version__ = "0.1.0"

from .bank import BASE_NAME, delete_adapter, list_adapters, select_adapters  # noqa: E402
from .models.base_models import load_base_model  # noqa: E402
from .recipes.budget import ffba_parameter_count, lora_parameter_count, zflora_parameter_count  # noqa: E402
from .config import FFBAConfig, ZFLoRAConfig  # noqa: E402
from .fastpath.compile import compile_decode  # noqa: E402
from .fastpath.plan import plan_gemms  # noqa: E402
from .fused import fuse, unfuse  # noqa: E402
from .model import (  # noqa: E402
    apply_adapter,
    apply_ffba,
    parameter_summary,
    print_trainable_parameters,
    remove_adapter,
    remove_ffba,
)
from .serialization import BaseModelMismatchWarning, load_adapter, save_adapter  # noqa: E402
from .tuner import FFBAModel, ZFLoRAModel, register  # noqa: E402

register()  # FFBA and ZFLORA in PEFT's registries: get_peft_model, PeftModel.from_pretrained

__all__ = [
    "BASE_NAME",
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
