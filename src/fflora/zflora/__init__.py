"""zFLoRA, the zero-latency member of the family (design: shared/design/zflora.md): the adapter
state rides in r extra residual channels. `layers`: its parameters and training form; `fused`: the
widened base GEMMs; `model`: apply, remove, parameter names. Use it through `fflora.apply_adapter`
with a `fflora.ZFLoRAConfig`."""

from torch import nn

from ..config import ZFLoRAConfig


def is_zflora(model: nn.Module) -> bool:
    """Whether `model` carries zFLoRA (rather than FFBA, or nothing)."""
    return isinstance(getattr(model, "ffba_config", None), ZFLoRAConfig)
