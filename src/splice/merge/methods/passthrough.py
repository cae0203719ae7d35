"""Passthrough: copy one model's tensor unchanged, optionally scaled (the building block of layer-stacking
"frankenmerges"; https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#passthrough).

    θ = scale · θ_1

It takes exactly one input; the base, if any, is ignored (in mergekit a configured base counts as an input, and
passthrough then refuses the pair).
"""
from __future__ import annotations

from torch import Tensor

from splice.merge.methods import _common as c
from splice.merge.methods.registry import Param, TensorContext, merge_method


@merge_method("passthrough", space="weights", needs_base=False,
              reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#passthrough",
              model_params={"scale": Param(float, 1.0, help="multiply the tensor by this (1: unchanged)")})
def passthrough(base: Tensor | None, tensors: list[Tensor], *, ctx: TensorContext | None = None,
                scale: list[float] | float = 1.0) -> Tensor:
    """Return the single input tensor, times `scale` (https://github.com/arcee-ai/mergekit)."""
    c.count("passthrough", tensors, 1, 1, ctx, what="model")
    (s,) = c.per_model("passthrough", "scale", scale, 1, ctx)
    return tensors[0] if s == 1 else tensors[0] * s
