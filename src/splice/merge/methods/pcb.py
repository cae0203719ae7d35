"""PCB-merging: Parameter Competition Balancing (Du et al., NeurIPS 2024), https://arxiv.org/abs/2410.02396

Every parameter of every task vector τ_i gets a score β_i that balances two kinds of competition:

    intra-balancing  β_intra,i = Softmax(N · Norm(τ_i ∘ τ_i))          (its importance inside its own task)
    inter-balancing  β_inter,i = Σ_j Softmax(Norm(τ_i ∘ τ_j))           (its agreement with the other tasks)
    score            β_i = β_intra,i ∘ β_inter,i
    drop             m_i = β_i ≥ sorted(β_i)[(1 − r)·d]                  (keep the top r = `density` per task)
    rescale          τ_m = Σ_i (m_i ∘ β_i ∘ τ_i) / Σ_i (m_i ∘ β_i),      θ = θ₀ + λ·τ_m

We follow the authors' reference code (github.com/duguodong7/pcb-merging, ``pcb-merging.py``), which is how the
paper's numbers were produced, where it makes the equations concrete:

- ``Norm`` is a per-task min-max normalisation, applied to |τ_i| before squaring; Softmax is replaced by exp (the
  softmax denominator is one constant per task and cancels in the per-task normalisation of the final weights).
- The inter term is ``tanh(τ_i ∘ Σ_j τ_j)``: positive where τ_i agrees in sign with the sum of all tasks, negative
  (and so dropped first) where it fights it.
- Before scoring, |τ_i| is clamped to its [0.0001, 0.9999] quantiles (the reference's outlier clamp), and the merge
  uses the clamped values.
- The kept scores are shifted and scaled per task to (0, 1]: w_i = m_i ∘ (β_i − t_i) / (max β_i − t_i), t_i the
  largest dropped score. The reference instead clamps at the smallest kept score, which gives that one entry weight
  0; we take the largest dropped score so that exactly ``density`` of every task keeps a positive weight.

Defaults: ``density`` 0.2 (the paper sweeps r ∈ {0.05 … 0.2}; its NLP/LLM settings use 0.1–0.2) and ``lambda`` 1.0
(weights are already normalised by Σ w; the paper tunes λ around 1, e.g. 1.2 after its evolutionary search).
``density`` is per model (as in mergekit's sparsifying methods), so a global value applies to every task.
A per-model ``weight`` (default 1) multiplies τ_i's term in the numerator only, the role of the reference's per-task
λ_i (which it tunes by evolutionary search; we take no search and default to 1).
"""
from __future__ import annotations

import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.merge.methods.registry import Param, TensorContext, merge_method

OUTLIER_QUANTILE = 1e-4  # the reference's min_ratio/max_ratio for the |τ| clamp


def _minmax(x: Tensor) -> Tensor:
    """Per-row (x − min) / (max − min); a constant row maps to 0 instead of 0/0."""
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)


def _clamp_outliers(a: Tensor, ratio: float = OUTLIER_QUANTILE) -> Tensor:
    """Clamp each row of `a` to its [ratio, 1 − ratio] order statistics (the reference's index rule)."""
    d = a.shape[1]
    lo_k = int(d * ratio) + 1  # kthvalue is 1-based; reference: sorted[int(d·ratio)]
    hi_k = max(int(d * (1 - ratio)), 1)  # reference: sorted[int(d·(1 − ratio)) − 1]
    lo = a.kthvalue(lo_k, dim=1, keepdim=True).values
    hi = a.kthvalue(hi_k, dim=1, keepdim=True).values
    return torch.maximum(torch.minimum(a, hi), lo)


def pcb_weights(tensors: list[Tensor], density: float | list[float]) -> tuple[Tensor, Tensor]:
    """The PCB weights of each task vector's parameters, and the clamped task vectors they apply to.

    Args:
        tensors: the task vectors τ_i, all of one shape.
        density: the fraction r of each task's parameters that keeps a weight (one for all, or one per task).

    Returns:
        (weights, clamped): both (n_models, *shape), float32; ``weights`` is 0 on dropped parameters and in (0, 1]
        on exactly round(density_i · numel) kept ones of task i (at least 1; ties at the cut may get 0).
    """
    n = len(tensors)
    flat = torch.stack([t.reshape(-1) for t in tensors]).float()
    d = flat.shape[1]
    mag = _clamp_outliers(flat.abs())
    clamped = torch.sign(flat) * mag
    intra = torch.exp(n * _minmax(mag) ** 2)  # exp(N · Norm(|τ_i|)²): big entries of a task dominate it
    inter = torch.tanh(flat * flat.sum(dim=0, keepdim=True))  # Σ_j τ_i τ_j: agreement with the other tasks
    score = intra * inter
    del intra, inter, flat, mag
    densities = density if isinstance(density, (list, tuple)) else [density] * n
    weights = torch.zeros_like(score)
    for i, r in enumerate(densities):
        k = min(d, max(1, round(float(r) * d)))
        top = score[i].topk(k)
        best = top.values[0]
        if k < d:  # t_i: the largest dropped score, so every kept entry gets a positive weight
            floor = score[i].kthvalue(d - k).values
        else:  # nothing dropped: shift just below the minimum
            lowest = score[i].min()
            floor = lowest - 1e-6 * (best - lowest) - torch.finfo(score.dtype).tiny
        span = (best - floor).clamp_min(torch.finfo(score.dtype).tiny)
        weights[i, top.indices] = ((top.values - floor) / span).clamp_min(0.0)
    shape = (n, *tensors[0].shape)
    return weights.reshape(shape), clamped.reshape(shape)


@merge_method(
    "pcb",
    space="delta",
    reference="https://arxiv.org/abs/2410.02396",
    params={"lambda": Param(float, 1.0, help="scale of the merged task vector")},
    model_params={
        "density": Param(float, 0.2, help="fraction of this task vector's parameters kept (the paper's ratio r)"),
        "weight": Param(float, 1.0, help="multiplier of this task's term (the reference's per-task λ_i)"),
    },
)
def pcb(base: Tensor, tensors: list[Tensor], *, ctx: TensorContext, density: float | list[float] = 0.2,
        weight: float | list[float] | None = None, **params) -> Tensor:
    """PCB merge of the task vectors of one tensor: Σ λ_i w_i τ_i / Σ w_i over the balanced, dropped weights w_i."""
    lam = float(params.get("lambda", 1.0))
    _check_same_shape(tensors, ctx)
    densities = _per_model(density, len(tensors), "density", ctx)
    for r in densities:
        if not 0.0 < r <= 1.0:
            raise SpliceError(f"{ctx.name}: pcb density must be in (0, 1], got {r}")
    weights, clamped = pcb_weights(tensors, densities)
    lams = torch.tensor(_per_model(1.0 if weight is None else weight, len(tensors), "weight", ctx))
    lams = lams.reshape(-1, *([1] * tensors[0].dim()))
    # λ_i scales only the numerator (as the reference applies its per-task λ_i to the rescaled vectors), so equal
    # weights of 2 double the merged vector, like task arithmetic's weights.
    # Where no task keeps a parameter the denominator is 0 and so is the merged delta: it stays at the base.
    merged = (lams * weights * clamped).sum(dim=0) / weights.sum(dim=0).clamp_min(1e-12)
    return (lam * merged).to(tensors[0].dtype)


def _check_same_shape(tensors: list[Tensor], ctx: TensorContext) -> None:
    if not tensors:
        raise SpliceError(f"{ctx.name}: no input tensors to merge")
    for i, t in enumerate(tensors[1:], start=1):
        if t.shape != tensors[0].shape:
            raise SpliceError(f"{ctx.name}: input {i} has shape {tuple(t.shape)}, input 0 has "
                              f"{tuple(tensors[0].shape)}")


def _per_model(value: float | list[float], n: int, name: str, ctx: TensorContext) -> list[float]:
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * n
    if len(values) != n:
        raise SpliceError(f"{ctx.name}: pcb {name} has {len(values)} values for {n} models")
    return values
