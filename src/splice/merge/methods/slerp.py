"""SLERP: spherical linear interpolation between two models (Shoemake 1985; https://en.wikipedia.org/wiki/Slerp).

The first endpoint is the base model, the second the one other model (as in mergekit: t = 0 gives the base,
t = 1 the other). Over the whole tensor flattened to vectors v0, v1, with Ω the angle between them:

    cos Ω = ⟨v0/‖v0‖, v1/‖v1‖⟩  (clamped to [−1, 1]; a norm ≤ 1e-8 is taken as 1)
    θ = sin((1 − t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1

The unnormalized v0, v1 are interpolated, so the result's norm moves between ‖v0‖ and ‖v1‖ (on the sphere when
they are equal). When |cos Ω| > 0.9995 (nearly colinear or antipodal) it falls back to lerp (1 − t) v0 + t v1.
Computed in float32 (float64 for float64 inputs), in chunks of 2²⁰ entries (norms as the norm of chunk norms),
and returned in the input dtype, exactly as mergekit 0.1.5 does (``slerp.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.merge.methods import _common as c
from splice.merge.methods.registry import Param, TensorContext, merge_method

_CHUNK = 1 << 20  # entries per float32 scratch chunk (mergekit's _CHUNK_ELEMENTS)


def _chunked_norm(x: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x[i:i + _CHUNK].to(dtype))
                                                 for i in range(0, x.numel(), _CHUNK)]))


def slerp_vectors(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """SLERP from `v0` (t=0) to `v1` (t=1) over the flattened tensors; returns v0's shape and dtype."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1), v1.reshape(-1)  # (n,), still in the input dtype
    tt = torch.tensor(t, dtype=dtype, device=a.device)
    if a.numel() == 0:
        return ((1 - tt) * a.to(dtype) + tt * b.to(dtype)).reshape(v0.shape).to(v0.dtype)
    chunks = range(0, a.numel(), _CHUNK)
    # The norm of per-chunk norms: float32 reductions over millions of entries drift (~1e-4 relative at 3M
    # entries); chunking keeps them accurate, bounds the float32 scratch, and reproduces mergekit's rounding.
    norm_a = _chunked_norm(a, dtype)
    norm_b = _chunked_norm(b, dtype)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    # Normalize before multiplying: a raw dot of large weights could overflow.
    dot = torch.stack([((a[i:i + _CHUNK].to(dtype) / norm_a) * (b[i:i + _CHUNK].to(dtype) / norm_b)).sum()
                       for i in chunks]).sum().clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    omega = torch.acos(torch.where(linear, 0, dot))  # keep the unused branch finite
    sin_omega = torch.sin(omega)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * omega) / sin_omega)
    coef_b = torch.where(linear, tt, torch.sin(tt * omega) / sin_omega)
    out = torch.empty_like(a)  # (n,) in the input dtype
    for i in chunks:
        out[i:i + _CHUNK] = coef_a * a[i:i + _CHUNK].to(dtype) + coef_b * b[i:i + _CHUNK].to(dtype)
    return out.reshape(v0.shape)


@merge_method("slerp", space="weights", needs_base=True, reference="https://en.wikipedia.org/wiki/Slerp",
              params={"t": Param(float, required=True, help="0 gives the base, 1 the other model")})
def slerp(base: Tensor | None, tensors: list[Tensor], *, ctx: TensorContext | None = None, t: float) -> Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1) (https://en.wikipedia.org/wiki/Slerp)."""
    base = c.need_base("slerp", base, ctx)
    c.count("slerp", tensors, 1, 1, ctx, what="model besides the base")
    c.same_shapes("slerp", [base, *tensors], ctx)
    dtype = c.work_dtype(base, *tensors)
    if not dtype.is_floating_point:
        raise SpliceError(f"slerp: needs floating-point tensors{c.where(ctx)}, got {dtype}")
    return slerp_vectors(float(t), base.to(dtype), tensors[0].to(dtype))
