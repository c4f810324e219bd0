"""Which adapter methods fflora has, without importing any: one per folder under `fflora/methods/` that
holds a `method.py` (its `METHOD`: the `Method` behind which the folder's configuration, layers and fused
form sit; `fflora.methods.registry` imports each). Found on disk, so that the torch-free parts (the
command line's choices, the settings of recipes and benches) list the same methods as the registry
without loading PyTorch, and a new method is its folder: no list elsewhere names it.
"""

from __future__ import annotations

import functools
from pathlib import Path

METHODS_DIR = Path(__file__).resolve().parents[1] / "methods"
DEFAULT_METHOD = "ffba"  # the paper's method: what commands and recipes take when none is named


@functools.cache
def method_names() -> tuple[str, ...]:
    """The methods' names ("ffba", "zflora"), sorted: the registry's order."""
    return tuple(sorted(path.parent.name for path in METHODS_DIR.glob("*/method.py")))
