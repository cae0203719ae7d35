"""Adapter methods registered by name.

A method is a config dataclass plus the class that holds one named adapter on one wrapped module. Registering
both under one name is what lets `splice train --method NAME`, the PEFT loader and the benchmarks find a method
without a list to keep in sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from splice.errors import SpliceError, closest


@dataclass(frozen=True)
class Method:
    """One registered adapter method: its name, config class, per-module adapter class and paper link."""

    name: str
    config: type
    adapter: type
    reference: str = ""


METHODS: dict[str, Method] = {}


def register(name: str, *, config: type, reference: str = "") -> Callable[[type], type]:
    """Class decorator registering `adapter_cls` as method `name` with its config class."""

    def wrap(adapter_cls: type) -> type:
        if name in METHODS:
            raise ValueError(f"adapter method {name!r} is registered twice")
        METHODS[name] = Method(name, config, adapter_cls, reference)
        config.method = name  # type: ignore[attr-defined]
        return adapter_cls

    return wrap


def get_method(name: str) -> Method:
    """Look a method up by name, with a did-you-mean suggestion on a typo."""
    _load_builtin_methods()
    if name not in METHODS:
        raise SpliceError(f"unknown adapter method {name!r}{closest(name, METHODS)}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(METHODS)


def make_config(method: str, **fields: Any):
    """Build the config of `method` from plain fields (from YAML or CLI flags), rejecting unknown keys."""
    from splice.adapters.config import config_from_dict

    return config_from_dict(get_method(method).config, fields)


def _load_builtin_methods() -> None:
    # Importing the method modules runs their @register decorators.
    import splice.adapters.adalora  # noqa: F401
    import splice.adapters.bitfit  # noqa: F401
    import splice.adapters.boft  # noqa: F401
    import splice.adapters.dora  # noqa: F401
    import splice.adapters.fourierft  # noqa: F401
    import splice.adapters.ia3  # noqa: F401
    import splice.adapters.loha  # noqa: F401
    import splice.adapters.ln_tuning  # noqa: F401
    import splice.adapters.lokr  # noqa: F401
    import splice.adapters.miss  # noqa: F401
    import splice.adapters.oft  # noqa: F401
    import splice.adapters.randlora  # noqa: F401
    import splice.adapters.shira  # noqa: F401
    import splice.adapters.vera  # noqa: F401
    import splice.adapters.lora  # noqa: F401
    import splice.adapters.prompts  # noqa: F401
    import splice.adapters.houlsby  # noqa: F401
    import splice.adapters.pfeiffer  # noqa: F401
    import splice.adapters.compacter  # noqa: F401
    import splice.adapters.ssf  # noqa: F401
    import splice.adapters.dylora  # noqa: F401
    import splice.adapters.increlora  # noqa: F401
    import splice.adapters.sara  # noqa: F401
    import splice.adapters.spiel  # noqa: F401
    import splice.adapters.s2ft  # noqa: F401
    import splice.adapters.paca  # noqa: F401
    import splice.adapters.nola  # noqa: F401
    import splice.adapters.svfit  # noqa: F401
    import splice.adapters.sorsa  # noqa: F401
    import splice.adapters.svft  # noqa: F401
    import splice.adapters.loldu  # noqa: F401
    import splice.adapters.lora_sb  # noqa: F401
