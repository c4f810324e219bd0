"""Serving many adapters: a continuous-batching engine over an adapter bank, and an OpenAI-compatible server."""

from .engine import BankEngine, sampling_generation_config

__all__ = ["BankEngine", "sampling_generation_config"]
