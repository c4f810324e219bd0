"""fflora's version (pyproject.toml holds the same string), recorded in every saved adapter."""

__version__ = "0.1.0"
