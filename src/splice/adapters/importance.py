"""The importance scores and the orthogonality regulariser shared by the rank-adaptive methods (AdaLoRA, IncreLoRA).

AdaLoRA (Zhang et al. 2023, https://arxiv.org/abs/2303.10512, Eq. 8–11) scores each entry w of a factor by its
smoothed sensitivity times its uncertainty, updated after every step while the gradients are there:

    I = |w · ∂L/∂w|,   Ī ← β₁Ī + (1 − β₁)I,   Ū ← β₂Ū + (1 − β₂)|I − Ī|,   s(w) = Ī · Ū

and a triplet (P_i, λ_i, Q_i) of an SVD-shaped update P Λ Q by s(λ_i) + mean s(P_{·i}) + mean s(Q_{i·}). AdaLoRA
prunes the least important triplets; IncreLoRA grows the modules whose triplets score highest.
"""
from __future__ import annotations

from collections.abc import Iterable

from typing import Any

import torch
from torch import Tensor

from splice.errors import SpliceError


def check_importance_fields(config: Any) -> None:
    """One line for the fields both rank-adaptive configs have: the EMA betas, dropout, the regulariser weight."""
    for name in ("beta1", "beta2"):
        if not 0.0 < float(getattr(config, name)) < 1.0:
            raise SpliceError(f"{name}: must be in (0, 1), got {getattr(config, name)!r}")
    if not 0.0 <= float(config.lora_dropout) < 1.0:
        raise SpliceError(f"lora_dropout: must be in [0, 1), got {config.lora_dropout!r}")
    if float(config.orth_reg_weight) < 0:
        raise SpliceError(f"orth_reg_weight: must be ≥ 0, got {config.orth_reg_weight!r}")


class Sensitivity:
    """Smoothed sensitivity Ī and uncertainty Ū of every entry of the parameters it is given, keyed by identity."""

    def __init__(self, beta1: float, beta2: float):
        self.beta1, self.beta2 = beta1, beta2
        self.ipt: dict[int, Tensor] = {}  # id(param) → EMA sensitivity Ī
        self.unc: dict[int, Tensor] = {}  # id(param) → EMA uncertainty Ū

    @torch.no_grad()
    def update(self, params: Iterable[Tensor]) -> None:
        """One EMA step from the current gradients (parameters without a gradient are left as they are)."""
        b1, b2 = self.beta1, self.beta2
        for p in params:
            if p.grad is None:
                continue
            sensitivity = (p * p.grad).abs()
            ipt = self.ipt.setdefault(id(p), torch.zeros_like(p))
            unc = self.unc.setdefault(id(p), torch.zeros_like(p))
            ipt.mul_(b1).add_(sensitivity, alpha=1 - b1)
            unc.mul_(b2).add_((sensitivity - ipt).abs(), alpha=1 - b2)

    def score(self, p: Tensor) -> Tensor:
        """s(w) = Ī · Ū for every entry of `p` (zeros before its first gradient)."""
        if id(p) not in self.ipt:
            return torch.zeros_like(p)
        return self.ipt[id(p)] * self.unc[id(p)]

    def triplet_scores(self, A: Tensor, E: Tensor, B: Tensor) -> Tensor:
        """(r,) score of each triplet of Q = A (r, in), Λ = E (r, 1), P = B (out, r)."""
        return self.score(E).view(-1) + self.score(A).mean(1) + self.score(B).mean(0)

    def reset(self) -> None:
        self.ipt, self.unc = {}, {}


def orthogonality(factors: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """Mean over (A, B) pairs of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (AdaLoRA's regulariser on Q and P)."""
    terms = []
    for A, B in factors:
        for cov in (A @ A.t(), B.t() @ B):
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    return torch.stack(terms).mean()
