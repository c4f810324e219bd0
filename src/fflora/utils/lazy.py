"""Imports deferred until they are needed, so that `fflora --help` starts without PyTorch.

`lazy_exports` gives a package the module-level `__getattr__` of PEP 562 (what transformers' own
`_LazyModule` does): its public names are imported from their modules when first read. `when_imported`
runs a callback right after a module (PEFT) is imported, or at once if it already is: `import fflora`
registers FFBA and zFLoRA with PEFT without importing PEFT itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]):
    """(`__getattr__`, `__dir__`) for `package`: each name in `exports` is read from its module
    (relative to the package) on first use, then kept as an attribute of the package."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(vars(sys.modules[package])))

    return __getattr__, __dir__


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A finder that hands `name`'s real spec on with itself as the loader, runs the real loader and then
    `callback`. It stays until the module is really imported: `importlib.util.find_spec(name)` alone (an
    availability check, as transformers makes for PEFT) imports nothing and must not use it up."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback, self.loader, self._finding = name, callback, None, False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self._finding:
            return None
        self._finding = True  # the real finders, not this one, answer the lookup below
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # imported now: once is enough
        self.loader.exec_module(module)
        self.callback()

    def __getattr__(self, attribute: str):  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self.__dict__["loader"], attribute)


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call `callback()` once module `name` is imported: now if it is, else right after its import."""
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))
