"""PiSSA: principal singular values and vectors adaptation (Meng et al. 2024, https://arxiv.org/abs/2404.02948).

    W₀ = U S Vᵀ,   A₀ = √(S_r / s) V_rᵀ,   B₀ = U_r √(S_r / s)      so that  s B₀ A₀ = U_r S_r V_rᵀ

The adapter starts on the top-r singular triplets of the base weight and trains on the residual W₀ − s B₀ A₀.
"""
from __future__ import annotations

import torch
from torch import Tensor


def pissa_start(W: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor]:
    """(A₀ (r, in), B₀ (out, r)) from the (out, in) base weight `W` (float32)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = (S[:r] / scale).sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]
