"""Fisher merging (Matena & Raffel, NeurIPS 2022), https://arxiv.org/abs/2111.09832

Each model's posterior is approximated (Laplace) by a Gaussian centred at its weights θ_i with the diagonal Fisher
information F_i as precision; the merge maximises the joint (weighted) log-likelihood, which for diagonal
precisions is the element-wise Fisher-weighted average

    θ* = Σ_i w_i F_i ∘ θ_i / Σ_i w_i F_i.

Equal Fishers give the weighted average of the weights (model soup: the isotropic Gaussian case); a model whose
Fisher dominates an entry wins that entry. The Fishers come from `splice.merge.calibration.compute_fisher` (mean
squared gradient over the calibration batches), one per model, via ``ctx.extras["fisher"]``.

Choices where the paper leaves a detail open:
- Floor: F_i is clamped from below at ``epsilon`` (default 1e-6; the authors' code has such a ``fisher_floor``), so an entry no
  model's data touched falls back to the weighted average instead of 0/0.
- The authors optionally normalise each model's Fisher by its norm over the whole model; a per-tensor method cannot
  see the whole model, so that option is not offered (calibrate every model on the same data instead).
- A tensor with no Fisher for any model (a buffer, or a tensor tied to another) is the weighted average; a Fisher
  missing for only some models is an error.
"""
from __future__ import annotations

import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.merge.methods._common import calibration_extras, model_weights
from splice.merge.methods.registry import Param, TensorContext, merge_method


def weighted_average(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """Σ w_i θ_i / Σ w_i in float32 (the fallback of the data-aware methods)."""
    total = sum(weights)
    if total == 0:
        raise SpliceError("the model weights sum to 0; cannot average")
    return sum(t.float() * w for t, w in zip(tensors, weights)) / total


@merge_method(
    "fisher",
    space="weights",
    reference="https://arxiv.org/abs/2111.09832",
    params={"epsilon": Param(float, 1e-6, help="floor of the Fisher values")},
    model_params={"weight": Param(float, 1.0, help="weight of this model (its scalar prior strength)")},
    needs={"fisher"},
)
def fisher(base: Tensor | None, tensors: list[Tensor], *, ctx: TensorContext, epsilon: float = 1e-6,
           weight: list[float] | None = None, **_: object) -> Tensor:
    """Element-wise Fisher-weighted average of the models' tensors."""
    weights = model_weights(tensors, weight, ctx)
    fishers = calibration_extras(ctx, "fisher", "Fisher tensor", len(tensors))
    if fishers is None:
        return weighted_average(tensors, weights).to(tensors[0].dtype)
    if epsilon <= 0:
        raise SpliceError(f"fisher epsilon must be positive, got {epsilon}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:  # Σ w F would be 0 or change sign: inf / NaN weights
        raise SpliceError(f"{ctx.name}: fisher weights must be non-negative with a positive sum, got {weights}")
    num = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    den = torch.zeros_like(num)
    for i, (t, f, w) in enumerate(zip(tensors, fishers, weights)):
        if f.shape != t.shape:
            raise SpliceError(f"{ctx.name}: Fisher of model {i} has shape {tuple(f.shape)}, the tensor "
                              f"{tuple(t.shape)}")
        fw = f.float().to(num.device).clamp_min(epsilon) * w
        num += fw * t.float().to(num.device)
        den += fw
    return (num / den).to(tensors[0].dtype)
