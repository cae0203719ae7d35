"""NearSwap (alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001): take the other model's
value only where it is already near the base.

Per entry, with base a, model b and threshold t:

    w = clamp(t / max(|a − b|, 1e-6), 0, 1)
    θ = w · b + (1 − w) · a

Entries that differ by at most t are swapped to b entirely; larger differences move toward b only by t/|a − b|.
Numerics as mergekit 0.1.5 (``nearswap.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from splice.merge.methods import _common as c
from splice.merge.methods.registry import Param, TensorContext, merge_method


@merge_method("nearswap", space="weights", needs_base=True,
              reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
              params={"t": Param(float, required=True, help="similarity threshold: |base − model| below it swaps")})
def nearswap(base: Tensor | None, tensors: list[Tensor], *, ctx: TensorContext | None = None, t: float) -> Tensor:
    """NearSwap (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001): swap in near-identical entries."""
    a = c.need_base("nearswap", base, ctx)
    c.count("nearswap", tensors, 1, 1, ctx, what="models besides the base")
    c.same_shapes("nearswap", [a, *tensors], ctx)
    dtype = c.work_dtype(a, *tensors)
    a, b = a.to(dtype), tensors[0].to(dtype)
    w = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * a
