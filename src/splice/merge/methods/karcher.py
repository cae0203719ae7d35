"""Karcher mean: the Riemannian (Fréchet) centre of mass of the models' directions on the unit sphere
(Karcher 1977, doi:10.1002/cpa.3160300502; https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean).

Each tensor x_i (flattened) is split into its norm r_i and direction u_i = x_i / r_i. With equal weights
α_i = 1/N, the mean direction μ minimizes Σ_i α_i d(μ, u_i)² (d = great-circle angle), found by Riemannian
gradient steps from the normalized Euclidean mean:

    v = Σ_i α_i · θ_i / sin θ_i · (u_i − cos θ_i μ),   cos θ_i = ⟨μ, u_i⟩       # log map (mean tangent vector)
    μ ← cos ‖v‖ μ + sin ‖v‖ v/‖v‖                                             # exp map
    until ‖v‖ < tol or max_iter steps;   result = (Σ_i α_i r_i) · μ

Inputs with norm ≤ tol take no part in the direction (they still count in the norm average); if all do, the result
is zero. Numerics as mergekit 0.1.5 (``karcher.py``: norms in float32, directions in the input dtype). Like
mergekit it works on whole weights and ignores a base (pass the base in `tensors` to include it).
"""
from __future__ import annotations

import torch
from torch import Tensor

from splice.merge.methods import _common as c
from splice.merge.methods.registry import Param, TensorContext, merge_method


def karcher_mean(tensors: list[Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Weighted Karcher mean of `tensors` on the sphere, scaled by the weighted mean of their norms."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    units = [torch.zeros_like(t) if r.item() == 0.0 else (t / r).to(t.dtype) for t, r in zip(tensors, norms)]
    valid = [i for i, r in enumerate(norms) if r.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [units[i] for i in valid]

    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mean += ai * ui
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = u[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            cos = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
            angle = torch.arccos(cos)
            if angle.item() < tol:
                continue
            tangent += ai * (angle / torch.sin(angle)) * (ui - cos * mean)
        step = torch.linalg.vector_norm(tangent.to(dtype))
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)

    return sum(ai * r for ai, r in zip(alphas, norms)) * mean


@merge_method("karcher", space="weights", needs_base=False, reference="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
              params={"max_iter": Param(int, 10, help="most Riemannian gradient steps"),
                      "tol": Param(float, 1e-5, help="stop when the mean tangent vector is shorter than this")})
def karcher(base: Tensor | None, tensors: list[Tensor], *, ctx: TensorContext | None = None, max_iter: int = 10,
            tol: float = 1e-5) -> Tensor:
    """Equal-weight Karcher (Riemannian) mean of the models on the sphere
    (https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean)."""
    c.count("karcher", tensors, 1, ctx=ctx)
    c.same_shapes("karcher", tensors, ctx)
    c.in_range("karcher", "max_iter", max_iter, 0, float("inf"), ctx)
    c.in_range("karcher", "tol", tol, 0.0, float("inf"), ctx)
    dtype = c.work_dtype(*tensors)
    xs = [t.to(dtype) for t in tensors]
    return karcher_mean(xs, [1.0 / len(xs)] * len(xs), max_iter=int(max_iter), tol=tol)
