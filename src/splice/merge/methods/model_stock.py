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

from collections.abc import Iterator
from typing import Any

from splice.merge.blocks import BlockSource, elementwise
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


def model_stock_blocks(source: BlockSource, *, ctx: TensorContext | None = None, filter_wise: bool = False,
                       **_: Any) -> Iterator[tuple[slice, Tensor]]:
    """`model_stock` on a large float32 tensor read in row blocks: with ``filter_wise`` each row is its own case
    (the whole function on each block, same bits); otherwise one pass sums the offsets' pairwise dot products and
    squared norms (one GEMM per block, summed over blocks in float64), then t is formed as the whole function forms
    it and a second pass interpolates block by block. The sums differ from one float32 reduction by float rounding
    only."""
    if filter_wise:
        yield from elementwise(model_stock)(source, ctx=ctx, filter_wise=True)
        return
    k = source.count
    c.count("model_stock", [None] * k, 2, ctx=ctx, what="models besides the base")
    dots = torch.zeros(k, k, dtype=torch.float64)
    for rows, thetas in source.blocks():
        w0 = source.base_block(rows).reshape(-1)
        offsets = torch.empty(k, w0.numel(), dtype=w0.dtype)
        for i, w in enumerate(thetas):
            torch.sub(w.reshape(-1), w0, out=offsets[i])
        dots += offsets @ offsets.t()  # one GEMM per block (float32 within it, float64 across blocks)
    norms = dots.diagonal().sqrt()
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            cosines.append((dots[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean().to(torch.float32).reshape(1)
    denominator = 1 + (k - 1) * cos
    t = torch.zeros_like(cos) if denominator.abs() < 1e-6 else k * cos / denominator
    for rows, thetas in source.blocks():
        w0 = source.base_block(rows)
        yield rows, t * (sum(thetas) / k) + (1 - t) * w0


merge_method("model_stock", space="weights", needs_base=True, reference="https://arxiv.org/abs/2403.19522",
             params={"filter_wise": Param(bool, False, help="one ratio per row instead of per tensor")},
             blocks=model_stock_blocks)(model_stock)
