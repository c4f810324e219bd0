"""fflora: fused forward-backward adapters (FFBA) for parameter-efficient fine-tuning of LLMs.

Reference implementation of FLoRA (Gowda, Song, Lee, Goka; arXiv 2511.00050). The paper's
equations are not public: the method implemented here is our reading of it, written down in
the README's "The method" section.

The names below load on first use (`fflora.utils.lazy`), so `import fflora` and `fflora --help`
cost no PyTorch import. Importing fflora registers FFBA and ZFLORA with PEFT (get_peft_model,
PeftModel.from_pretrained) as soon as PEFT is imported, before or after fflora.
"""

from .utils.lazy import lazy_exports, when_imported
from .utils.version import __version__

_EXPORTS = {
    **dict.fromkeys(["apply_adapter", "apply_ffba", "parameter_summary", "print_trainable_parameters",
                     "remove_adapter", "remove_ffba"], ".methods.adapters"),
    **dict.fromkeys(["FusedModel", "compile_decode", "delete_adapter", "fuse", "list_adapters", "plan_gemms",
                     "select_adapters", "unfuse"], ".methods.fused_model"),
    "BASE_NAME": ".methods.layers",
    "FFBAConfig": ".methods.ffba.config",
    "ffba_parameter_count": ".methods.ffba.method",
    "FFBAModel": ".methods.ffba.tuner",
    "register": ".methods.registration",
    **dict.fromkeys(["BaseModelMismatchError", "BaseModelMismatchWarning"], ".methods.adapter_files"),
    **dict.fromkeys(["load_adapter", "save_adapter"], ".methods.serialization"),
    "ZFLoRAConfig": ".methods.zflora.config",
    "zflora_parameter_count": ".methods.zflora.method",
    "ZFLoRAModel": ".methods.zflora.tuner",
    "load_base_model": ".models.base_models",
    "lora_parameter_count": ".recipes.budget",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(set(_EXPORTS) - {"register"})

when_imported("peft", lambda: __getattr__("register")())
