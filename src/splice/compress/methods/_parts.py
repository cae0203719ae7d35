"""Helpers shared by the methods: apply a per-tensor function to every part of a packed delta."""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from splice.compress.codec import CTensor, Packed
from splice.errors import SpliceError


def map_parts(delta: Packed, fn: Callable[[str, CTensor], CTensor]) -> Packed:
    """A new Packed with `fn(part_name, part)` applied to every part."""
    return Packed(delta.kind, {k: fn(k, p) for k, p in delta.parts.items()}, delta.shape, delta.scale)


def sparsified(delta: Packed, method: str, name: str, drop: Callable[[Tensor], Tensor]) -> Packed:
    """Every part decoded, passed through `drop` (a dense → dense-with-zeros function) and stored sparse.

    A low-rank delta is sparsified factor by factor: ΔW = s·B̃Ã, which for DARE's independent masks is still
    unbiased (E[B̃]E[Ã] = BA).
    """
    def one(part_name: str, part: CTensor) -> CTensor:
        if part.quantized:
            raise SpliceError(f"tensor {name!r}: {method} cannot act on quantized values (quantize last)")
        return CTensor.sparse_from_dense(drop(part.decode().float()))
    return map_parts(delta, one)


def check_density(method: str, density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise SpliceError(f"{method}: density must be in (0, 1], got {density}")
