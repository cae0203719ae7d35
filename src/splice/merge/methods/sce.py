"""SCE: Select, Calculate, Erase (FuseChat, Wan et al., https://arxiv.org/abs/2408.07990).

With task vectors τ_i = θ_i − θ_0 stacked as T (N, *shape):

    Select:    keep the ⌊select_topk · nnz(v)⌋ entries of largest variance across models, v = Var_i(τ_i)
               (population variance); the rest of every τ_i is zeroed. select_topk = 1 keeps everything.
    Calculate: w_i = mean(τ_i²) / Σ_j mean(τ_j²)            (uniform 1/N when Σ_j mean(τ_j²) < 1e-6)
    Erase:     m_i = [sign(τ_i) = sign(Σ_j τ_j)]            (TIES's sign election by mass; ties go to +)
    τ = Σ_i m_i w_i τ_i / max(Σ_i m_i w_i, 1e-6)

No per-model weights: the weights come from the deltas themselves. Numerics as mergekit 0.1.5 (``sce.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from splice.merge.methods import _common as c
from splice.merge.methods.generalized import consensus_mask
from splice.merge.methods.registry import Param, TensorContext, merge_method


def select_mask(deltas: Tensor, fraction: float, mask_dtype: torch.dtype | None = None) -> Tensor:
    """1 on the top-`fraction` entries by cross-model variance (of those with nonzero variance), else 0; (*shape)."""
    if fraction <= 0:
        return torch.zeros_like(deltas[0], dtype=mask_dtype)
    if fraction >= 1:
        return torch.ones_like(deltas[0], dtype=mask_dtype)
    var = torch.var(deltas, dim=0, unbiased=False)  # (*shape)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var, dtype=mask_dtype)
    if k == 0:
        return mask
    top = torch.topk(var.abs().reshape(-1), k=k, largest=True).indices
    mask.view(-1)[top] = 1
    return mask


def sce_weights(deltas: Tensor) -> Tensor:
    """w_i ∝ mean(τ_i²), summing to 1; uniform when all deltas are (nearly) zero. Shape (N,)."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


@merge_method("sce", space="delta", reference="https://arxiv.org/abs/2408.07990",
              params={"select_topk": Param(float, 1.0, help="fraction of highest-variance entries to keep"),
                      "int8_mask": Param(bool, False, help="build masks in int8 (saves memory, same result)")})
def sce(base: Tensor, deltas: list[Tensor], *, ctx: TensorContext | None = None, select_topk: float = 1.0,
        int8_mask: bool = False) -> Tensor:
    """SCE merge of task vectors (https://arxiv.org/abs/2408.07990): variance select, energy weights, sign erase."""
    if not deltas:
        return torch.zeros_like(base)
    c.in_range("sce", "select_topk", select_topk, 0.0, 1.0, ctx)
    c.same_shapes("sce", [base, *deltas], ctx)
    dtype = c.work_dtype(base, *deltas)
    mask_dtype = torch.int8 if int8_mask else dtype
    stacked = torch.stack([d.to(dtype) for d in deltas], dim=0)  # (N, *shape)
    if select_topk < 1:
        stacked = stacked * select_mask(stacked, select_topk, mask_dtype).unsqueeze(0)
    agree = consensus_mask(stacked, "sum", mask_dtype)  # (N, *shape)
    w = sce_weights(stacked).reshape(-1, *[1] * base.dim())  # (N, 1, ..., 1)
    kept = w * agree
    return (stacked * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)
