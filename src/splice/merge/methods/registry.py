"""Merge methods registered by name: a pure function on the tensors of ONE weight name, plus its parameter schema.

Two kinds of method, told apart by `space`:

- ``space="delta"`` (task arithmetic and its family: TIES, DARE, breadcrumbs, DELLA, PCB, ...): the function gets
  the task vectors ``deltas[i] = models[i] - base`` and returns the merged delta; the executor adds it to the base.
- ``space="weights"`` (model soups, SLERP, Karcher mean, model stock, nearswap, passthrough): the function gets the
  base tensor (or None when the config has no base) and the full model tensors, and returns the merged tensor.

Per-model parameters (``weight``, ``density``, ...) arrive as lists aligned with the inputs; global parameters as
scalars. Methods that need more than the weights (Fisher information, Gram matrices of layer inputs) name those
inputs in `needs`; the planner supplies them in ``ctx.extras``. Random methods draw only from ``ctx.generator``,
which the executor seeds per tensor name, so a merge is reproducible.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from splice.registry import Registry, import_modules


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method: its type, default (None with required=True means it must be given)."""

    kind: type = float
    default: Any = None
    required: bool = False
    help: str = ""


@dataclass
class TensorContext:
    """What a method may know about the tensor it merges besides the tensors themselves."""

    name: str
    layer: int | None = None  # transformer block index, when the name has one
    num_layers: int | None = None
    generator: torch.Generator | None = None
    extras: dict[str, list[Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Tensor]
    space: Literal["delta", "weights"]
    reference: str
    params: dict[str, Param]
    model_params: dict[str, Param]
    needs_base: bool
    needs: frozenset[str] = frozenset()
    # The same function on a large tensor read in row blocks (see splice.merge.blocks), or None: merged whole.
    blocks: Callable[..., Iterator[tuple[slice, Tensor]]] | None = None


# One file per method in splice.merge.methods: importing it registers the method.
MERGE_METHODS: Registry[MergeMethod] = Registry(
    "merge_method", lambda: import_modules("splice.merge.methods", skip=("registry",)))


def merge_method(name: str, *, space: Literal["delta", "weights"], reference: str = "",
                 params: dict[str, Param] | None = None, model_params: dict[str, Param] | None = None,
                 needs_base: bool | None = None, needs: set[str] | frozenset[str] = frozenset(),
                 blocks: Callable[..., Iterator[tuple[slice, Tensor]]] | None = None):
    """Register `fn(base, tensors, *, ctx, **params)` as merge method `name`.

    `tensors` are deltas when space="delta" (then a base is always required), full weights when space="weights".
    """

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        MERGE_METHODS.add(name, MergeMethod(name, fn, space, reference, dict(params or {}), dict(model_params or {}),
                                            space == "delta" if needs_base is None else needs_base, frozenset(needs),
                                            blocks))
        return fn

    return wrap


def get_merge_method(name: str) -> MergeMethod:
    return MERGE_METHODS.lookup(name)


def merge_method_names() -> list[str]:
    return MERGE_METHODS.names()
