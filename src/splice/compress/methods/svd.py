"""SVD low-rank truncation of a delta: ΔW ≈ B A with B = U_r √S_r, A = √S_r V_rᵀ (Eckart–Young: the best rank-r
approximation, error ‖ΔW − BA‖_F = √(Σ_{i>r} s_i²)).

The residual encoding of ERE (catalogue #136) and of LoRA extraction (mergekit-extract-lora); the truncation is
Eckart & Young 1936, https://doi.org/10.1007/BF02288367. The rank is fixed (``rank``) or chosen per tensor from the spectrum
(``energy``: the fewest singular values holding that share of ‖ΔW‖²_F). Tensors of fewer than 2 dimensions
(biases, norms), and matrices whose low-rank form would not be smaller than the matrix, are left as they are.
A low-rank input (a LoRA) is re-truncated from its factors, never formed densely.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from splice.compress.codec import CTensor, Packed
from splice.compress.linalg import lowrank_svd, truncated_svd
from splice.compress.registry import Context, register
from splice.errors import SpliceError


@dataclass(frozen=True)
class SvdConfig:
    rank: int | None = field(default=None, metadata={"help": "rank kept per tensor"})
    energy: float | None = field(default=None, metadata={"help": "or: per tensor, the share of ||dW||^2 kept"})

    def __post_init__(self) -> None:
        check_rank_energy("svd", self.rank, self.energy, required=True)


def check_rank_energy(method: str, rank: int | None, energy: float | None, required: bool) -> None:
    if required and rank is None and energy is None:
        raise SpliceError(f"{method}: give rank or energy")
    if rank is not None and int(rank) < 1:
        raise SpliceError(f"{method}: rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 < float(energy) <= 1.0:
        raise SpliceError(f"{method}: energy must be in (0, 1], got {energy}")


def factorize(delta: Packed, rank: int | None, energy: float | None, name: str, must_shrink: bool = True):
    """(B, A) of the truncated delta as a (out, in_flat) product with the delta's scale folded in, or None when
    the tensor is left as it is (under 2-D, or, with `must_shrink`, not smaller in low-rank form)."""
    if any(p.quantized for p in delta.parts.values()):
        raise SpliceError(f"tensor {name!r}: cannot factorize quantized values (quantize last)")
    if len(delta.shape) < 2:
        return None
    m, n = delta.shape[0], math.prod(delta.shape[1:])
    if must_shrink and rank is not None and energy is None and rank * (m + n) >= m * n:
        return None
    if delta.kind == "lowrank":
        lr = delta.unpacked()
        B, A, _ = lowrank_svd(lr.B * lr.scale, lr.A, rank, energy)
    else:
        B, A, _ = truncated_svd(delta.parts["w"].decode().float().reshape(m, n), rank, energy)
    if must_shrink and B.shape[1] * (m + n) >= m * n and delta.kind == "dense":
        return None
    return B, A


def lowrank_packed(blocks: list[tuple], shape) -> Packed:
    """Packed low-rank delta from [(B_i (out, r_i), A_i (r_i, in))] blocks."""
    parts = {}
    for i, (B, A) in enumerate(blocks):
        parts[f"Bt.{i}"] = CTensor(B.t().shape, B.t().contiguous().reshape(-1))
        parts[f"A.{i}"] = CTensor(A.shape, A.contiguous().reshape(-1))
    return Packed("lowrank", parts, shape, 1.0)


@register("svd", config=SvdConfig, reference="https://doi.org/10.1007/BF02288367", stages=("lowrank",))
def svd(delta: Packed, config: SvdConfig, ctx: Context) -> Packed:
    f = factorize(delta, config.rank, config.energy, ctx.name)
    return delta if f is None else lowrank_packed([f], delta.shape)
