"""Which adapters a running server may load, and under which names.

Loading at run time is off unless the server is started with `--enable-adapter-loading`, and then
only from folders below an `--adapter-root`: a relative `lora_path` is taken below a root, an absolute
one must lie inside one, and both are resolved (`..` and symbolic links followed) before the check.
Error messages name paths as the client gave them, never the server's own.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..methods import BASE_NAME
from ..methods.adapter_files import RUN_ADAPTER

MAX_NAME_LENGTH = 128


def adapter_name_problem(name: str, base_name: str) -> str | None:
    """What is wrong with `name` as an adapter's name in the API, or None. Names appear in JSON, logs
    and URLs of clients: short, printable, no path separators, and not the base model's."""
    if not name or len(name) > MAX_NAME_LENGTH:
        return f"an adapter name has 1 to {MAX_NAME_LENGTH} characters, got {len(name)}"
    if not name.isprintable() or name != name.strip():
        return "an adapter name has no control characters and no leading or trailing whitespace"
    if "/" in name or "\\" in name:
        return "an adapter name has no '/' or '\\'"
    if name in (base_name, BASE_NAME):
        return f"'{name}' names the base model; choose another adapter name"
    return None


def check_adapter_names(names, base_name: str) -> None:
    """ValueError naming the first of `names` (given with --adapter) that cannot name an adapter."""
    for name in names:
        problem = adapter_name_problem(name, base_name)
        if problem:
            raise ValueError(f"--adapter {name!r}: {problem}")


class AdapterRoots:
    """The folders runtime loads may read from (`enabled` False: runtime loading is off)."""

    def __init__(self, enabled: bool, roots: list[str | os.PathLike]) -> None:
        if enabled and not roots:
            raise ValueError("--enable-adapter-loading needs at least one --adapter-root DIR: the folders adapters "
                             "may be loaded from at run time")
        missing = [str(r) for r in roots if not Path(r).is_dir()]
        if missing:
            raise ValueError(f"--adapter-root {missing[0]!r} is not a folder")
        self.enabled = enabled
        self.roots = [Path(os.path.realpath(r)) for r in roots]

    def resolve(self, given: str) -> Path:
        """The real folder `given` names, inside a root, with every file in it (and in the `adapter/` of a
        run folder: what the loader may open) inside a root too; ValueError (naming only `given`) otherwise."""
        path = Path(given)
        candidates = [path] if path.is_absolute() else [root / path for root in self.roots]
        existing = [c for c in candidates if c.exists()] or candidates
        real = Path(os.path.realpath(existing[0]))
        files = [f for folder in (real, real / RUN_ADAPTER) if folder.is_dir() for f in folder.iterdir()]
        if not all(self._inside(Path(os.path.realpath(p))) for p in (real, *files)):
            raise ValueError(f"lora_path {given!r} is outside the folders this server loads adapters from, or holds "
                             "files that are (a relative path is taken below an --adapter-root; '..' and links that "
                             "lead out are refused)")
        return real

    def _inside(self, real: Path) -> bool:
        return any(real == root or root in real.parents for root in self.roots)

    def without_paths(self, message: str, real: Path, given: str) -> str:
        """`message` with the resolved folder written as the client gave it and the roots hidden."""
        message = message.replace(str(real), given)
        for root in self.roots:
            message = message.replace(str(root), "<adapter-root>")
        return message
