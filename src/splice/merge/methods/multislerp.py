"""Multi-SLERP: barycentric interpolation of several models on a hypersphere (Goddard,
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).

With weights w_i (normalized to sum 1 by default), the flattened inputs x_i (task vectors x_i = θ_i − θ_0 when a
base is given), their norms r_i and unit vectors u_i = x_i / (r_i + ε):

    μ = normalize(Σ_i w_i u_i)                         # weighted Euclidean mean, pulled onto the sphere
    v = Σ_i w_i (u_i − ⟨u_i, μ⟩ μ)                     # log map: mean of the tangent vectors at μ
    θ = (cos ‖v‖ μ + sin ‖v‖ v/‖v‖) · Σ_i w_i r_i      # exp map back to the sphere, at the mean norm
    (+ θ_0 when a base is given)

One input is returned as it is, and so is a tensor every input leaves at the base (all x_i = 0; mergekit raises
there, which fails every merge of LoRA fine-tunes, whose other tensors are the base's). If Σ_i w_i u_i vanishes
otherwise (antipodal inputs with balancing weights), two inputs fall back to their weighted sum and more are an error. Computed in the input dtype with ε = 1e-8, as mergekit 0.1.5.
"""
from __future__ import annotations

import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.merge.methods import _common as c
from splice.merge.methods.registry import Param, TensorContext, merge_method


@merge_method("multislerp", space="weights", needs_base=False,
              reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
              params={"normalize_weights": Param(bool, True, help="scale the weights to sum to 1"),
                      "eps": Param(float, 1e-8, help="numerical floor for norms")},
              model_params={"weight": Param(float, required=True, help="weight of this model")})
def multislerp(base: Tensor | None, tensors: list[Tensor], *, ctx: TensorContext | None = None,
               weight: list[float] | float, normalize_weights: bool = True, eps: float = 1e-8) -> Tensor:
    """Weighted spherical mean of N models via the tangent space at their mean direction
    (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea)."""
    c.count("multislerp", tensors, 1, ctx=ctx)
    c.same_shapes("multislerp", [base, *tensors], ctx)
    weights = c.per_model("multislerp", "weight", weight, len(tensors), ctx)
    if len(tensors) == 1:
        return tensors[0]
    dtype = c.work_dtype(base, *tensors)
    x = torch.stack([t.to(dtype) for t in tensors], dim=0)  # (N, *shape)
    if base is not None:
        x = x - base.to(dtype)
    flat = x.reshape(x.shape[0], -1)  # (N, n)
    w = torch.tensor(weights, dtype=dtype, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)  # (N, 1)
    if not norms.any():  # every input is the base (a tensor no fine-tune changed): nothing to interpolate
        return x[0] if base is None else base.to(dtype)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] != 2:
            raise SpliceError(f"multislerp: parameter 'weight' balances antipodal inputs to a zero mean{c.where(ctx)};"
                              " use different weights")
        out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
        return out if base is None else out + base.to(dtype)
    mean = mean / mean_norm
    tangent = (units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)  # (N, n)
    v = tangent.sum(0)
    v_norm = torch.norm(v) + eps
    out = mean * torch.cos(v_norm) + v * (torch.sin(v_norm) / v_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out if base is None else out + base.to(dtype)
