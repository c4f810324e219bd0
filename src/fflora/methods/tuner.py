"""FFBA and zFLoRA as PEFT methods: `get_peft_model(model, fflora.FFBAConfig(r=8))`.

PEFT's tuners replace one module at a time (`_create_and_replace` per matched `target_modules` name).
FFBA's backward adapter carries state across sub-blocks and layers and zFLoRA widens the residual
stream, so their tuner does the whole-model surgery of `fflora.apply_adapter` in `inject_adapter`
and hands PEFT the rest through its hooks: the adapter's state-dict entries (their names carry no
adapter name: a model holds one adapter in training form), the on/off switch (`tuner_layer`),
merging as fusing (`fflora.fuse`: the forward adapter bypasses the attention core and the MLP, so
FFBA cannot be folded into the base weights; its merged form is the fused one), and unloading.

Each method's tuner is `tuner_for(method)`, made from its `Method` (`ffba.tuner.FFBAModel`,
`zflora.tuner.ZFLoRAModel` name them); `registration.register()` puts them in PEFT's registries.
"""

from __future__ import annotations

import functools

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .adapters import adapter_parameters, apply_adapter, remove_adapter
from .fused_model import FusedModel, fuse, unfuse
from .interface import Method
from .layers import AdapterSwitch


def _one_adapter_only(what: str) -> ValueError:
    return ValueError(
        f"{what}: an fflora model holds one FFBA or zFLoRA adapter in training form. To serve many adapters "
        "from one base model, load them into the adapter bank: fflora.load_adapter(base, path, adapter_name=...)"
    )


def _set_trainable(model: nn.Module, trainable: bool) -> None:
    for param in adapter_parameters(model).values():
        param.requires_grad_(trainable)


class AdapterTuner(BaseTuner):
    """What FFBA's and zFLoRA's tuners share (PEFT's `BaseTuner` interface; `config_cls` says which)."""

    config_cls: type
    tuner_layer_cls = AdapterSwitch
    target_module_mapping: dict[str, list[str]] = {}  # no target_modules: the method adapts every decoder layer
    uses_shared_state = True  # state crosses sub-blocks and layers

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        return peft_config

    def _create_and_replace(self, *args, **kwargs) -> None:
        raise NotImplementedError(f"{type(self).__name__} adapts whole decoder layers in inject_adapter")

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        """Build the adapter on `model` (fflora.apply_adapter); PEFT calls this for a new adapter."""
        config = self.peft_config[adapter_name]
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} takes a {self.config_cls.__name__}, got {type(config).__name__}")
        if len(self.peft_config) > 1:
            raise _one_adapter_only(f"cannot add adapter {adapter_name!r} beside {sorted(set(self.peft_config) - {adapter_name})}")
        apply_adapter(model, config)
        for module in model.modules():
            if isinstance(module, AdapterSwitch):
                module._active_adapter = adapter_name
        if config.inference_mode:
            _set_trainable(model, False)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        if FusedModel.of(self.model) is not None:
            raise ValueError("the adapter is fused into the base projections (merge_adapter); call "
                             "unmerge_adapter() before switching it off or on")
        super()._enable_adapter_layers(enabled)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != list(self.peft_config):
            raise _one_adapter_only(f"cannot activate {names} (the model holds {list(self.peft_config)})")
        _set_trainable(self.model, not inference_mode)
        self.active_adapter = names[0]

    def delete_adapter(self, adapter_name: str) -> None:
        raise ValueError(f"cannot delete {adapter_name!r}, the model's only adapter: unload() takes it off and "
                         "returns the base model")

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        raise ValueError("FFBA and zFLoRA adapters cannot be combined by weights (their parts cross sub-blocks); "
                         "serve several side by side in the adapter bank instead (fflora.load_adapter(..., adapter_name=...))")

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Fuse the adapter into the base projections, in place (FFBA's merged form; `fflora.fuse`)."""
        fuse(self.model)

    def unmerge_adapter(self) -> None:
        unfuse(self.model)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """The fused model without PEFT's wrapper or tuner layers: same logits, the adapter inside the base
        GEMMs and nowhere else (`FusedModel.drop_training_form`)."""
        FusedModel.build(self.model).drop_training_form()
        return self._without_peft_config()

    def unload(self) -> nn.Module:
        """The base model again, the adapter taken off."""
        remove_adapter(self.model)
        return self._without_peft_config()

    def _without_peft_config(self) -> nn.Module:
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name: str, state_dict: dict, unwanted_adapter_names) -> dict:
        """The entries of `state_dict` that are this adapter's parameters (found by identity, not by name)."""
        ours = {id(p) for p in adapter_parameters(model.get_base_model() if hasattr(model, "get_base_model") else model).values()}
        names = {name for name, p in model.named_parameters() if id(p) in ours}
        return {k: v for k, v in state_dict.items() if k in names}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # the parameter names carry no adapter name


@functools.cache
def tuner_for(method: Method) -> type[AdapterTuner]:
    """The PEFT tuner of `method` (peft_type `method.peft_type`), made once: `get_peft_model(model,
    config)` builds the method's adapter through it."""
    return type(method.config_class.__name__.removesuffix("Config") + "Model", (AdapterTuner,), {
        "__doc__": f"PEFT's tuner for {method.title} (peft_type {method.peft_type!r}).",
        "__module__": f"fflora.methods.{method.name}.tuner",
        "prefix": method.tuner_prefix, "config_cls": method.config_class})
