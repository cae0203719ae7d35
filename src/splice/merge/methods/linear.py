"""Linear merge / model soup (Wortsman et al., https://arxiv.org/abs/2203.05482).

    θ = Σ_i w_i θ_i / Σ_i w_i      (normalize=True, the default: a weighted average, the "uniform soup" for w_i = 1)
    θ = Σ_i w_i θ_i                (normalize=False)

Works on whole weights and ignores any base model (as mergekit does: there a configured base is just one more
input, so a planner reproducing mergekit passes it in `tensors` with its own weight). Like mergekit, it accumulates
in float32 (float64 for float64 inputs) and returns the inputs' dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.merge.methods import _common as c
from splice.merge.blocks import elementwise
from splice.merge.methods.registry import Param, TensorContext, merge_method


def linear(base: Tensor | None, tensors: list[Tensor], *, ctx: TensorContext | None = None,
           weight: list[float] | float, normalize: bool = True) -> Tensor:
    """Weighted average of whole weights, the model soup (https://arxiv.org/abs/2203.05482)."""
    c.count("linear", tensors, 1, ctx=ctx)
    c.same_shapes("linear", tensors, ctx)
    weights = c.per_model("linear", "weight", weight, len(tensors), ctx)
    out_dtype = c.work_dtype(*tensors)
    if not out_dtype.is_floating_point:
        raise SpliceError(f"linear: needs floating-point tensors{c.where(ctx)}, got {out_dtype}")
    dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    w = torch.tensor(weights, dtype=dtype, device=tensors[0].device)  # (N,)
    if normalize and w.sum() == 0:
        raise SpliceError(f"linear: parameter 'weight' sums to 0, cannot normalize{c.where(ctx)}")
    out = torch.zeros_like(tensors[0], dtype=dtype)
    for tensor, wi in zip(tensors, w):
        out.addcmul_(tensor, wi)
    if normalize:
        out.div_(w.sum())
    return out.to(out_dtype)


# Elementwise, so merged block by block it gives the whole tensor's bits.
merge_method("linear", space="weights", needs_base=False, reference="https://arxiv.org/abs/2203.05482",
             params={"normalize": Param(bool, True, help="divide by the sum of the weights")},
             model_params={"weight": Param(float, required=True, help="weight of this model")},
             blocks=elementwise(linear))(linear)
