"""The forms a weight update can take.

A fine-tune changes a weight as ``W_ft = W_0 + ΔW``. Each class here stores ``ΔW`` for one tensor in one
parameterisation and can turn it back into a dense tensor (`materialize`) or add it to a weight in place
(`apply_to`), the latter without building the dense ``ΔW`` whenever the form allows it.

Forms are frozen dataclasses of tensors; ``eq=False`` keeps identity equality and hashing, because elementwise
tensor ``==`` has no single truth value.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from splice.errors import SpliceError

__all__ = ["Delta", "Dense", "LowRank", "Sparse", "Scale", "Kron", "FORMS"]


@runtime_checkable
class Delta(Protocol):
    """The update of one tensor, in some form.

    Attributes:
        shape: The shape of the full weight the delta updates.
        nbytes: Bytes held by the stored tensors.
        numel_stored: Number of stored elements.
    """

    @property
    def shape(self) -> torch.Size: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def numel_stored(self) -> int: ...

    def materialize(self, base: Tensor | None = None) -> Tensor:
        """The dense ``ΔW``, with exactly `shape`; `base` is needed only by forms whose delta depends on it."""
        ...

    def apply_to(self, weight: Tensor, scale: float = 1.0) -> Tensor:
        """Add ``scale * ΔW`` to `weight` in place and return it."""
        ...

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Delta:
        """A copy of the form with its stored tensors cast/moved."""
        ...


def _check_weight(form: object, weight: Tensor) -> None:
    shape = form.shape  # type: ignore[attr-defined]
    if weight.shape != shape:
        raise SpliceError(
            f"{type(form).__name__} delta of shape {tuple(shape)} does not fit weight of shape {tuple(weight.shape)}"
        )


def _as_size(shape: torch.Size | tuple[int, ...] | list[int]) -> torch.Size:
    return torch.Size(int(s) for s in shape)


@dataclass(frozen=True, eq=False)
class Dense:
    """A full tensor: ``ΔW = tensor``."""

    tensor: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @property
    def numel_stored(self) -> int:
        return self.tensor.numel()

    def materialize(self, base: Tensor | None = None) -> Tensor:
        """Return ``ΔW`` (the stored tensor itself, not a copy)."""
        return self.tensor

    def apply_to(self, weight: Tensor, scale: float = 1.0) -> Tensor:
        """``W += scale * tensor``, in place."""
        _check_weight(self, weight)
        # No dtype cast: a mixed-dtype add_ computes in the wider type and rounds once into `weight`.
        return weight.add_(self.tensor.to(weight.device), alpha=scale)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Dense:
        """Cast/move the stored tensor."""
        return Dense(self.tensor.to(device=device, dtype=dtype))


@dataclass(frozen=True, eq=False)
class LowRank:
    """A low-rank product: ``ΔW = scale * (B @ A)``, reshaped to `shape`.

    ``B`` is ``(out, r)`` and ``A`` is ``(r, in_flat)``. `shape` defaults to ``(out, in_flat)``; a conv kernel of
    shape ``(out, in, kh, kw)`` is stored with ``in_flat = in * kh * kw``.
    """

    B: Tensor
    A: Tensor
    scale: float = 1.0
    shape: torch.Size = None  # type: ignore[assignment]  # filled from B and A in __post_init__

    def __post_init__(self) -> None:
        if self.B.dim() != 2 or self.A.dim() != 2 or self.B.shape[1] != self.A.shape[0]:
            raise SpliceError(
                f"LowRank: B {tuple(self.B.shape)} and A {tuple(self.A.shape)} must be (out, r) and (r, in)"
            )
        shape = _as_size(self.shape) if self.shape is not None else torch.Size((self.B.shape[0], self.A.shape[1]))
        if not shape or shape[0] != self.B.shape[0] or math.prod(shape) != self.B.shape[0] * self.A.shape[1]:
            raise SpliceError(
                f"LowRank: shape {tuple(shape)} does not match B {tuple(self.B.shape)} @ A {tuple(self.A.shape)}"
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nbytes(self) -> int:
        return self.B.numel() * self.B.element_size() + self.A.numel() * self.A.element_size()

    @property
    def numel_stored(self) -> int:
        return self.B.numel() + self.A.numel()

    def materialize(self, base: Tensor | None = None) -> Tensor:
        """Return ``scale * (B @ A)`` reshaped to `shape`."""
        return (self.B @ self.A).mul_(self.scale).reshape(self.shape)

    def apply_to(self, weight: Tensor, scale: float = 1.0) -> Tensor:
        """``W += scale * self.scale * B @ A`` as one ``addmm_``, never forming ``ΔW`` separately."""
        _check_weight(self, weight)
        if not weight.is_contiguous():  # view() needs contiguous memory; rare enough to pay for the dense path
            return weight.add_(self.materialize().to(weight.device), alpha=scale)
        if weight.dtype not in (torch.float32, torch.float64):
            # A half-precision weight: the product and the sum in float32, rounded once (bfloat16 factors and a
            # bfloat16 product would round three times).
            merged = weight.float()
            merged.view(self.shape[0], -1).addmm_(self.B.to(weight.device, torch.float32),
                                                  self.A.to(weight.device, torch.float32), alpha=scale * self.scale)
            return weight.copy_(merged)
        B = self.B.to(device=weight.device, dtype=weight.dtype)
        A = self.A.to(device=weight.device, dtype=weight.dtype)
        weight.view(self.shape[0], -1).addmm_(B, A, alpha=scale * self.scale)
        return weight

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LowRank:
        """Cast/move B and A."""
        B, A = self.B.to(device=device, dtype=dtype), self.A.to(device=device, dtype=dtype)
        return dataclasses.replace(self, B=B, A=A)


@dataclass(frozen=True, eq=False)
class Sparse:
    """A few changed entries: ``ΔW.flatten()[index] += values`` (repeated indices add up)."""

    index: Tensor
    values: Tensor
    shape: torch.Size

    def __post_init__(self) -> None:
        shape = _as_size(self.shape)
        object.__setattr__(self, "shape", shape)
        if self.index.dtype != torch.long or self.index.dim() != 1:
            raise SpliceError(
                f"Sparse: index must be a 1-D int64 tensor, got {self.index.dtype} {tuple(self.index.shape)}"
            )
        if self.values.shape != self.index.shape:
            raise SpliceError(f"Sparse: values {tuple(self.values.shape)} and index {tuple(self.index.shape)} differ")
        # Out-of-range indices would otherwise surface as a device-side assert far from their cause.
        if self.index.numel() and (int(self.index.min()) < 0 or int(self.index.max()) >= math.prod(shape)):
            raise SpliceError(f"Sparse: index out of range for shape {tuple(shape)}")

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.values.numel() * self.values.element_size()

    @property
    def numel_stored(self) -> int:
        return self.index.numel() + self.values.numel()

    def materialize(self, base: Tensor | None = None) -> Tensor:
        """Return a dense tensor of zeros with `values` added at the flat positions `index`."""
        out = torch.zeros(math.prod(self.shape), dtype=self.values.dtype, device=self.values.device)
        return out.index_add_(0, self.index, self.values).view(self.shape)

    def apply_to(self, weight: Tensor, scale: float = 1.0) -> Tensor:
        """``W.flatten()[index] += scale * values``, in place."""
        _check_weight(self, weight)
        values = (self.values * scale).to(device=weight.device, dtype=weight.dtype)
        index = self.index.to(weight.device)
        if not weight.is_contiguous():  # view(-1) would fail; index_put_ with accumulate works on any layout
            return weight.index_put_(torch.unravel_index(index, self.shape), values, accumulate=True)
        weight.view(-1).index_add_(0, index, values)
        return weight

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Sparse:
        """Move the index; cast/move the values (the index stays int64)."""
        return Sparse(self.index.to(device=device), self.values.to(device=device, dtype=dtype), self.shape)


@dataclass(frozen=True, eq=False)
class Scale:
    """A multiplicative update along one axis (the form of IA3): ``W_ft = W * v``, ``v`` broadcast along `axis`.

    The additive delta therefore depends on the base: ``ΔW = W * (v - 1)``.
    """

    vector: Tensor
    axis: int
    shape: torch.Size

    def __post_init__(self) -> None:
        shape = _as_size(self.shape)
        object.__setattr__(self, "shape", shape)
        if not -len(shape) <= self.axis < len(shape):
            raise SpliceError(f"Scale: axis {self.axis} is out of range for shape {tuple(shape)}")
        axis = self.axis % len(shape)
        object.__setattr__(self, "axis", axis)
        if self.vector.shape != (shape[axis],):
            raise SpliceError(
                f"Scale: vector of shape {tuple(self.vector.shape)} does not match axis {axis} of shape {tuple(shape)}"
            )

    @property
    def nbytes(self) -> int:
        return self.vector.numel() * self.vector.element_size()

    @property
    def numel_stored(self) -> int:
        return self.vector.numel()

    def _broadcast(self, t: Tensor) -> Tensor:
        view = [1] * len(self.shape)
        view[self.axis] = -1
        return t.view(view)

    def materialize(self, base: Tensor | None = None) -> Tensor:
        """Return ``base * (v - 1)``; a multiplicative update has no dense delta without its base.

        Raises:
            SpliceError: `base` is None or has the wrong shape.
        """
        if base is None:
            raise SpliceError("Scale delta is multiplicative: materialize() needs the base weight")
        _check_weight(self, base)
        return base * self._broadcast(self.vector.to(base.device) - 1)

    def apply_to(self, weight: Tensor, scale: float = 1.0) -> Tensor:
        """``W *= 1 + scale * (v - 1)``, in place; equal to ``W + scale * materialize(W)``."""
        _check_weight(self, weight)
        # Build the factor in at least fp32 so a bf16 vector's (v - 1) keeps its small differences.
        dtype = torch.promote_types(weight.dtype, torch.float32) if weight.is_floating_point() else torch.float32
        factor = (self.vector.to(device=weight.device, dtype=dtype) - 1).mul_(scale).add_(1)
        return weight.mul_(self._broadcast(factor))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Scale:
        """Cast/move the vector."""
        return Scale(self.vector.to(device=device, dtype=dtype), self.axis, self.shape)


@dataclass(frozen=True, eq=False)
class Kron:
    """A Kronecker product (the form of LoKr): ``ΔW = scale * kron(A, B)``, reshaped to `shape`.

    ``A`` is ``(a, c)`` and ``B`` is ``(b, d)``; the product is ``(a·b, c·d)``. A conv kernel ``(out, in, kh, kw)``
    is stored with ``B`` flattened to ``(b, d_in·kh·kw)``, which gives the same tensor once reshaped. Storage is
    ``a·c + b·d`` numbers for an ``(a·b) × (c·d)`` update.
    """

    A: Tensor
    B: Tensor
    scale: float = 1.0
    shape: torch.Size = None  # type: ignore[assignment]  # filled from A and B in __post_init__

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2:
            raise SpliceError(f"Kron: A {tuple(self.A.shape)} and B {tuple(self.B.shape)} must both be matrices")
        rows, cols = self.A.shape[0] * self.B.shape[0], self.A.shape[1] * self.B.shape[1]
        shape = _as_size(self.shape) if self.shape is not None else torch.Size((rows, cols))
        if not shape or shape[0] != rows or math.prod(shape) != rows * cols:
            raise SpliceError(f"Kron: shape {tuple(shape)} does not match kron(A {tuple(self.A.shape)}, "
                              f"B {tuple(self.B.shape)})")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    @property
    def numel_stored(self) -> int:
        return self.A.numel() + self.B.numel()

    def materialize(self, base: Tensor | None = None) -> Tensor:
        """Return ``scale * kron(A, B)`` reshaped to `shape`."""
        return torch.kron(self.A, self.B).mul(self.scale).reshape(self.shape)

    def apply_to(self, weight: Tensor, scale: float = 1.0) -> Tensor:
        """``W += scale * self.scale * kron(A, B)``, in place, through a 4-D view of W (blocks × block entries).

        The product is still formed once, at the weight's size: a Kronecker update touches every entry.
        """
        _check_weight(self, weight)
        (a, c), (b, d) = self.A.shape, self.B.shape
        A = self.A.to(device=weight.device, dtype=weight.dtype)
        B = self.B.to(device=weight.device, dtype=weight.dtype)
        product = torch.einsum("ij,kl->ikjl", A, B)  # (a, b, c, d): row i·b + k, column j·d + l
        if not weight.is_contiguous():
            return weight.add_(product.reshape(self.shape), alpha=scale * self.scale)
        weight.view(a, b, c, d).add_(product, alpha=scale * self.scale)
        return weight

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Kron:
        """Cast/move A and B."""
        A, B = self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype)
        return dataclasses.replace(self, A=A, B=B)


FORMS: dict[str, type] = {"dense": Dense, "lowrank": LowRank, "sparse": Sparse, "scale": Scale, "kron": Kron}
