"""NuSLERP: SLERP between two models by relative weight, row-wise or flattened, optionally on task vectors
(mergekit's "new slerp"; https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp).

With weights w_1, w_2 the interpolation point is t = w_2 / (w_1 + w_2) (0.5 when w_1 + w_2 ≈ 0). Given a base θ_0
it interpolates the task vectors and adds the base back (a "ChipAlign"-style geodesic merge of deltas):

    θ = θ_0 + slerp(t, θ_1 − θ_0, θ_2 − θ_0)        (without a base: slerp(t, θ_1, θ_2))

    slerp(t, v0, v1) = (sin((1 − t)Ω) v0 + sin(tΩ) v1) / sin Ω,   cos Ω = ⟨v0/‖v0‖, v1/‖v1‖⟩

over the whole tensor (``nuslerp_flatten``, the default), else per row along the last dim, or along dim 0 with
``nuslerp_row_wise``. Norms are clamped at 1e-7; exactly colinear rows (1 − cos²Ω ≤ 1e-16) use lerp. Unlike
``slerp`` there is no near-colinear threshold. Computed in the input dtype, as mergekit 0.1.5 (``nuslerp.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from splice.merge.methods import _common as c
from splice.merge.methods.registry import Param, TensorContext, merge_method


def _unit(x: Tensor, eps: float = 1e-7) -> Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


def nuslerp_vectors(t: float, v0: Tensor, v1: Tensor, dim: int = -1, flatten: bool = False,
                    eps: float = 1e-8) -> Tensor:
    """SLERP from `v0` (t=0) to `v1` (t=1) along `dim` (every other dim batched), or over everything if `flatten`."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)  # (..., 1)
    colinear = (1 - cos.square()) <= eps ** 2
    omega = torch.acos(torch.where(colinear, 0, cos))  # keep the unused branch finite
    out = (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@merge_method("nuslerp", space="weights", needs_base=False,
              reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp",
              params={"nuslerp_row_wise": Param(bool, False, help="interpolate along dim 0 instead of the last"),
                      "nuslerp_flatten": Param(bool, True, help="interpolate the whole tensor as one vector")},
              model_params={"weight": Param(float, required=True, help="relative weight of this model")})
def nuslerp(base: Tensor | None, tensors: list[Tensor], *, ctx: TensorContext | None = None,
            weight: list[float] | float, nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True) -> Tensor:
    """SLERP of two models, or of their task vectors on a base, at t = w_2/(w_1 + w_2)
    (https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp)."""
    c.count("nuslerp", tensors, 2, 2, ctx, what="models besides the base")
    c.same_shapes("nuslerp", [base, *tensors], ctx)
    w = c.per_model("nuslerp", "weight", weight, 2, ctx)
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    dtype = c.work_dtype(base, *tensors)
    a, b = tensors[0].to(dtype), tensors[1].to(dtype)
    dim = 0 if nuslerp_row_wise else -1
    if base is None:
        return nuslerp_vectors(t, a, b, dim=dim, flatten=nuslerp_flatten)
    base = base.to(dtype)
    return base + nuslerp_vectors(t, a - base, b - base, dim=dim, flatten=nuslerp_flatten)
