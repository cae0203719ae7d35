"""Compression methods by name: each is a config dataclass plus `fn(delta: Packed, config, ctx) -> Packed`.

A method acts on one tensor's delta. Methods compose left to right (``"dare,quantize"``) in stage order: a
low-rank factorisation first, then sparsification, then quantization (quantized values cannot be pruned or
factorised again), each stage at most once; a method that spans stages (ComPEFT: sparsify + quantize, Delta-CoMe:
low-rank + quantize) takes them all.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from splice.errors import SpliceError, closest
from splice.registry import Registry, import_modules

STAGES = ("lowrank", "sparsify", "quantize")


@dataclass(frozen=True)
class Context:
    """What a method may need beyond the delta: the tensor's name (for messages) and a seeded generator."""

    name: str
    generator: torch.Generator


@dataclass(frozen=True)
class Compressor:
    name: str
    config: type
    fn: Callable[..., Any]
    reference: str
    stages: tuple[str, ...]


# One file per method in splice.compress.methods: importing it registers the method.
_REGISTRY: Registry[Compressor] = Registry("compression method", lambda: import_modules("splice.compress.methods"))


def register(name: str, *, config: type, reference: str, stages: tuple[str, ...]) -> Callable:
    """Decorator: register `fn(delta, config, ctx) -> Packed` as compression method `name`."""
    def wrap(fn: Callable) -> Callable:
        _REGISTRY.add(name, Compressor(name, config, fn, reference, stages))
        return fn
    return wrap


def compressor_names() -> list[str]:
    return _REGISTRY.names()


def get_compressor(name: str) -> Compressor:
    return _REGISTRY.lookup(name)


def make_config(method: Compressor, params: dict[str, Any]) -> Any:
    """The method's config from the params it has fields for (validated by the dataclass)."""
    names = {f.name for f in dataclasses.fields(method.config)}
    try:
        return method.config(**{k: v for k, v in params.items() if k in names})
    except TypeError as err:
        raise SpliceError(f"method {method.name!r}: {err}") from None


def parse_methods(methods: str | list[str], params: dict[str, Any]) -> list[tuple[Compressor, Any]]:
    """``"dare,quantize"`` + shared params → [(method, config)], checked for stage order and unused params.

    A param goes to every method in the chain that has a field of that name (``density`` to both of two
    sparsifiers would be pointless, and stage order forbids it).

    Raises:
        SpliceError: an unknown method, a stage out of order or repeated, or a param no chosen method takes.
    """
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    if not names:
        raise SpliceError("--method: name at least one compression method")
    chain = [get_compressor(n) for n in names]
    last = -1
    for c in chain:
        first = STAGES.index(c.stages[0])
        if first <= last:
            raise SpliceError(f"--method {','.join(names)}: {c.name!r} ({'+'.join(c.stages)}) cannot follow "
                              f"{STAGES[last]}; order is {' → '.join(STAGES)}, each once")
        last = STAGES.index(c.stages[-1])
    used = {f.name for c in chain for f in dataclasses.fields(c.config)}
    for key in params:
        if key not in used:
            raise SpliceError(f"parameter {key!r} is not used by {','.join(names)}{closest(key, used)}; "
                              f"they take: {', '.join(sorted(used))}")
    return [(c, make_config(c, params)) for c in chain]
