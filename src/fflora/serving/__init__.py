"""Serving many adapters: an engine that batches requests for different adapters continuously."""

from .engine import BankEngine

__all__ = ["BankEngine"]
