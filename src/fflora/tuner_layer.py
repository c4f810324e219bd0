"""PEFT's tuner-layer interface on fflora's adapter modules, so that PEFT sees them and can switch them off.

PEFT's `PeftModel.disable_adapter()` and `get_model_status()` walk the model for `BaseTunerLayer`
modules and toggle `enable_adapters`. LoRA's layers wrap one `nn.Linear` each, keyed by adapter name;
fflora's adapter modules (an FFBA sub-block's FA and BA, a zFLoRA sub-block's read and write, zFLoRA's
head merge) span several projections and hold one adapter each, so they take only the switch: the
training-form projections skip an adapter whose `disable_adapters` is set.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer

ADAPTER_NAME = "default"  # PEFT's name for the one adapter a model holds in training form


class AdapterSwitch(BaseTunerLayer):
    """Mixed into an fflora adapter module (before `nn.Module`): PEFT's on/off switch and status."""

    adapter_layer_names: tuple[str, ...] = ()  # fflora's parameters are plain attributes, not per-name dicts
    _active_adapter = ADAPTER_NAME

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the adapter on or off; its parameters keep their requires_grad."""
        self._disable_adapters = not enabled
