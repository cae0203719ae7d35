"""Subspace merging of task matrices: TSV-Merge and Iso-C.

**TSV-Merge** (Task Singular Vectors, Gargiulo et al., CVPR 2025), https://arxiv.org/abs/2412.00081

Each layer's task vector is a matrix, and its singular vectors say where in the layer the task lives. For T task
matrices τ_i = U_i Σ_i V_iᵀ of one (m, n) weight, r = min(m, n):

    keep k = ⌊r / T⌋ top singular triplets of each task (so the merged rank is at most T·k ≤ r)
    U = [U_1[:, :k] … U_T[:, :k]],  Σ = diag(Σ_1[:k] … Σ_T[:k]),  V = [V_1[:, :k] … V_T[:, :k]]
    decorrelate: U⊥ = P Qᵀ for U = P S Qᵀ (the orthogonal Procrustes / polar factor, the nearest matrix with
    orthonormal columns), likewise V⊥
    τ = α · U⊥ Σ V⊥ᵀ

The whitening removes the interference between tasks' subspaces; when the tasks already sit in mutually orthogonal
subspaces of rank ≤ k, U and V are already orthonormal and the merge is exactly Σ_i τ_i. As in the authors' code
(github.com/AntoAndGar/task_singular_vectors), tensors that are not 2-D (biases, norms, conv kernels) are averaged.
Our choices: α defaults to 1.0 (no rescaling, so the sum of tasks in disjoint subspaces comes out exact); when
T > r, each task still keeps k = 1 triplet (the concatenation is then wider than it is tall, and its polar factor
has orthonormal rows); every 2-D tensor is treated as a matrix, embeddings included (the authors' CLIP code skips
only `text_projection`); a per-model ``weight`` scales τ_i before its SVD.

**Iso-C** (isotropic merging, Marczak et al., ICML 2025), https://arxiv.org/abs/2502.04959

Flatten the singular spectrum of the task-arithmetic sum so that every direction it spans gets the same weight:
Σ_i τ_i = U Σ Vᵀ  →  τ = α · mean(diag Σ) · U Vᵀ.  Non-2-D tensors are averaged, as in the authors' code
(github.com/danielm1405/iso-merging). α defaults to 1.0 (the paper tunes it on held-out data). Iso-CTS, which
adds task-specific subspaces, is not implemented.
"""
from __future__ import annotations

import torch
from torch import Tensor

from splice.merge.methods._common import model_weights
from splice.merge.methods.registry import Param, TensorContext, merge_method


def _weighted(tensors: list[Tensor], weight: list[float] | None, ctx: TensorContext) -> list[Tensor]:
    return [t.float() * w for t, w in zip(tensors, model_weights(tensors, weight, ctx))]


def _polar(x: Tensor) -> Tensor:
    """The orthogonal polar factor P Qᵀ of x = P S Qᵀ: the closest matrix (Frobenius) with orthonormal columns."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv_rank(shape: tuple[int, ...], num_models: int) -> int:
    """Singular triplets TSV-Merge keeps per task for a 2-D tensor of `shape`: ⌊min(m, n) / T⌋, at least 1."""
    return max(1, min(shape) // num_models)


def tsv_merge(tensors: list[Tensor]) -> Tensor:
    """TSV-Merge of 2-D task matrices (float32, unscaled): Σ_i of each task's top-k part, after decorrelation."""
    k = tsv_rank(tuple(tensors[0].shape), len(tensors))
    us, ss, vhs = [], [], []
    for t in tensors:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k, :])
    u_cat = torch.cat(us, dim=1)  # (m, T·k)
    v_cat = torch.cat(vhs, dim=0)  # (T·k, n), rows are the Vᵀ's
    s_cat = torch.cat(ss)
    u_orth = _polar(u_cat)
    vh_orth = _polar(v_cat.T).T
    return (u_orth * s_cat) @ vh_orth


@merge_method(
    "tsv",
    space="delta",
    reference="https://arxiv.org/abs/2412.00081",
    params={"alpha": Param(float, 1.0, help="scale of the merged task vector")},
    model_params={"weight": Param(float, 1.0, help="scale of this model's task vector before its SVD")},
)
def tsv(base: Tensor, tensors: list[Tensor], *, ctx: TensorContext, alpha: float = 1.0,
        weight: list[float] | None = None, **_: object) -> Tensor:
    """TSV-Merge of one tensor's task vectors; non-2-D tensors are averaged."""
    ts = _weighted(tensors, weight, ctx)
    merged = tsv_merge(ts) if ts[0].dim() == 2 else torch.stack(ts).mean(dim=0)
    return (float(alpha) * merged).to(tensors[0].dtype)


@merge_method(
    "iso_c",
    space="delta",
    reference="https://arxiv.org/abs/2502.04959",
    params={"alpha": Param(float, 1.0, help="scale of the merged task vector")},
    model_params={"weight": Param(float, 1.0, help="weight of this model's task vector in the sum")},
)
def iso_c(base: Tensor, tensors: list[Tensor], *, ctx: TensorContext, alpha: float = 1.0,
          weight: list[float] | None = None, **_: object) -> Tensor:
    """Iso-C: the sum of the task vectors with its singular values replaced by their mean; non-2-D averaged."""
    ts = _weighted(tensors, weight, ctx)
    if ts[0].dim() != 2:
        return (float(alpha) * torch.stack(ts).mean(dim=0)).to(tensors[0].dtype)
    u, s, vh = torch.linalg.svd(torch.stack(ts).sum(dim=0), full_matrices=False)
    return (float(alpha) * s.mean() * (u @ vh)).to(tensors[0].dtype)
