"""One registry shape for adapter methods, merge methods, compression methods and training strategies.

Each built-in entry registers itself when its module is imported (a decorator beside its math), so the registry
imports those modules on the first lookup, not when splice is imported: `import splice` stays cheap and a method
file is the only place that names its method.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import TypeVar

from splice.errors import SpliceError, closest

T = TypeVar("T")


class Registry(dict[str, T]):
    """Entries of one `kind` ("adapter method", ...) by name; `load` imports the built-in ones (once)."""

    def __init__(self, kind: str, load: Callable[[], None]) -> None:
        super().__init__()
        self.kind, self._load, self._loaded = kind, load, False

    def add(self, name: str, entry: T) -> None:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self[name] = entry

    def load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # set first: a module being imported may look an entry up (DoRA builds on LoRA)
        try:
            self._load()
        except BaseException:
            self._loaded = False
            raise

    def lookup(self, name: str) -> T:
        """The entry `name`, or one line naming the closest known names."""
        self.load()
        if name not in self:
            raise SpliceError(f"unknown {self.kind} {name!r}{closest(name, self)}; known: {', '.join(sorted(self))}")
        return self[name]

    def names(self) -> list[str]:
        self.load()
        return sorted(self)


def import_modules(package: str, skip: Iterable[str] = ()) -> None:
    """Import every module of `package` and its subpackages (but `skip` and private ones): one file per method
    registers itself."""
    pkg = importlib.import_module(package)
    skip = set(skip)
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
        last = info.name.rsplit(".", 1)[1]
        if last not in skip and not last.startswith("_"):
            importlib.import_module(info.name)
