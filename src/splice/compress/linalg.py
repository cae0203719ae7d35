"""Truncated SVD of one delta matrix, used by SVD compression, Delta-CoMe and LoRA extraction.

For an (m, n) matrix with m ≥ n the top singular triplets come from the eigendecomposition of the n×n Gram
matrix ΔᵀΔ = V S² Vᵀ (float64, so squaring loses nothing that float32 data had), then U S = Δ V. This costs one
m·n² product and one n³ eigensolve, instead of the full SVD's bidiagonalisation of the whole (m, n) matrix. The
kept factors are balanced, B = U √S and A = √S Vᵀ (as mergekit's ``distribute_scale``), and the Frobenius error of
the rank-r truncation is √(Σ_{i>r} s_i²) (Eckart–Young).
"""
from __future__ import annotations

import torch
from torch import Tensor

from splice.errors import SpliceError

__all__ = ["choose_rank", "truncated_svd", "lowrank_svd"]


def choose_rank(s: Tensor, rank: int | None, energy: float | None) -> int:
    """`rank` itself, or the fewest singular values whose squares hold `energy` of Σ s²."""
    if energy is None:
        return min(int(rank), s.numel()) if rank is not None else s.numel()
    power = s.double().pow(2)
    total = float(power.sum())
    if total == 0:
        return 0
    r = int((power.cumsum(0) < energy * total * (1 - 1e-12)).sum()) + 1
    return min(r, s.numel()) if rank is None else min(r, int(rank), s.numel())


def truncated_svd(mat: Tensor, rank: int | None = None, energy: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top singular triplets of a 2-D `mat`: (B (m, r), A (r, n), s (all singular values, descending)), with
    B @ A the best rank-r approximation of `mat`, B = U√S, A = √S Vᵀ (float32)."""
    if mat.dim() != 2:
        raise SpliceError(f"SVD needs a matrix, got shape {tuple(mat.shape)}")
    m, n = mat.shape
    x = mat.double()
    tall = m >= n
    gram = x.t() @ x if tall else x @ x.t()  # (k, k), k = min(m, n)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    s = evals.sqrt()
    r = choose_rank(s, rank, energy)
    basis = evecs[:, :r]  # V_r (tall) or U_r (wide)
    proj = x @ basis if tall else basis.t() @ x  # U_r S_r (m, r) or S_r V_rᵀ (r, n)
    # Recompute s_r from the projection: exact for the chosen basis, and free of the Gram's rounding.
    s_r = proj.norm(dim=0 if tall else 1)
    root = s_r.sqrt()
    safe = torch.where(root > 0, root, torch.ones_like(root))
    if tall:
        B, A = proj / safe, (basis * root).t()
    else:
        B, A = basis * root, proj / safe[:, None]
    return B.float().contiguous(), A.float().contiguous(), s.float()


def lowrank_svd(B: Tensor, A: Tensor, rank: int | None = None,
                energy: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`truncated_svd` of B @ A without forming it: thin QRs of B and Aᵀ, then the SVD of the r×r core."""
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().t())
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    Bn = (qb @ u[:, :r]) * root
    An = root[:, None] * (vh[:r] @ qa.t())
    return Bn.float().contiguous(), An.float().contiguous(), s.float()
