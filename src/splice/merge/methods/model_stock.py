"""Model Stock (Jang et al., https://arxiv.org/abs/2403.19522): interpolate toward the fine-tunes' average by angle.

With the base θ_0 and k ≥ 2 fine-tunes θ_i, offsets δ_i = θ_i − θ_0 and cos θ the mean pairwise cosine of the δ_i:

    t = k cos θ / (1 + (k − 1) cos θ)
    θ = t · (1/k) Σ_i θ_i + (1 − t) · θ_0

Near-orthogonal offsets (cos θ → 0) stay near the base; agreeing offsets (cos θ → 1) reach the average. The angle
is taken over the whole flattened tensor, or per row (per output filter, along the last dim) with
``filter_wise=True``. Where 1 + (k − 1) cos θ ≈ 0 (|·| < 1e-6) there is no finite estimate and the base is kept.
Numerics as mergekit 0.1.5 (norm products clamped at 1e-6, cosines clamped to [−1, 1]).
"""
from __future__ import annotations

import torch
from torch import Tensor

from splice.merge.methods import _common as c
from splice.merge.methods.registry import Param, TensorContext, merge_method


def interpolation_ratio(offsets: list[Tensor], count: int) -> Tensor:
    """t from the mean pairwise cosine of `offsets` along their last dim; shape (..., 1)."""
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos),
                       count * cos / torch.where(singular, torch.ones_like(denominator), denominator))


@merge_method("model_stock", space="weights", needs_base=True, reference="https://arxiv.org/abs/2403.19522",
              params={"filter_wise": Param(bool, False, help="one ratio per row instead of per tensor")})
def model_stock(base: Tensor | None, tensors: list[Tensor], *, ctx: TensorContext | None = None,
                filter_wise: bool = False) -> Tensor:
    """Model Stock (https://arxiv.org/abs/2403.19522): base-to-average interpolation set by the offsets' angle."""
    base = c.need_base("model_stock", base, ctx)
    c.count("model_stock", tensors, 2, ctx=ctx, what="models besides the base")
    c.same_shapes("model_stock", [base, *tensors], ctx)
    dtype = c.work_dtype(base, *tensors)
    w0, ws = base.to(dtype), [t.to(dtype) for t in tensors]
    if filter_wise:
        if w0.dim() == 1:  # a bias or norm vector is one filter
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    t = interpolation_ratio([w - w0 for w in ws], len(ws))
    average = sum(ws) / len(ws)
    return (t * average + (1 - t) * w0).reshape(base.shape)
