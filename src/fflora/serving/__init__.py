"""Serving many adapters: fflora's engine over static KV slots and an adapter bank, and an OpenAI-compatible server.

The names below load on first use (`fflora.utils.lazy`): `fflora serve --help` reads the settings
(`config`) without the engine's PyTorch."""

from ..utils.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"SlotEngine": ".slot_engine"})
__all__ = ["SlotEngine"]
