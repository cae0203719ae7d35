"""Adapter methods registered by name.

A method is a config dataclass plus the class that holds one named adapter on one wrapped module. Registering
both under one name is what lets `splice train --method NAME`, the PEFT loader and the benchmarks find a method
without a list to keep in sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from splice.registry import Registry, import_modules


@dataclass(frozen=True)
class Method:
    """One registered adapter method: its name, config class, per-module adapter class and paper link."""

    name: str
    config: type
    adapter: type
    reference: str = ""


# Every module of splice.adapters (prompt methods in its subpackage) registers what it defines when imported.
METHODS: Registry[Method] = Registry("adapter method", lambda: import_modules("splice.adapters"))


def register(name: str, *, config: type, reference: str = "") -> Callable[[type], type]:
    """Class decorator registering `adapter_cls` as method `name` with its config class."""

    def wrap(adapter_cls: type) -> type:
        METHODS.add(name, Method(name, config, adapter_cls, reference))
        config.method = name  # type: ignore[attr-defined]
        return adapter_cls

    return wrap


def get_method(name: str) -> Method:
    """Look a method up by name, with a did-you-mean suggestion on a typo."""
    return METHODS.lookup(name)


def method_names() -> list[str]:
    return METHODS.names()


def make_config(method: str, **fields: Any):
    """Build the config of `method` from plain fields (from YAML or CLI flags), rejecting unknown keys."""
    from splice.adapters.config import config_from_dict

    return config_from_dict(get_method(method).config, fields)
