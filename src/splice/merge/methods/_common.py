"""Small checks shared by the merge methods (not a method: the registry skips modules whose name starts with '_').

Every failure is a one-line `SpliceError` that names the parameter (and the tensor, when the context gives one).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from splice.errors import SpliceError, closest
from splice.merge.methods.registry import Param, TensorContext


def where(ctx: TensorContext | None) -> str:
    """' for tensor NAME' when the context names one, else ''."""
    return f" for tensor {ctx.name!r}" if ctx is not None and ctx.name else ""


def per_model(method: str, name: str, value: Any, n: int, ctx: TensorContext | None = None) -> list[float]:
    """A per-model parameter as `n` floats: a list must have one value per model; a scalar is broadcast."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * n
    if isinstance(value, Tensor) and value.dim() == 0:
        return [float(value)] * n
    if not isinstance(value, (Sequence, Tensor)) or isinstance(value, str):
        raise SpliceError(f"{method}: parameter {name!r} must be a number or a list of numbers{where(ctx)}, "
                          f"got {value!r}")
    values = [float(v) for v in value]
    if len(values) != n:
        raise SpliceError(f"{method}: parameter {name!r} has {len(values)} values for {n} models{where(ctx)}")
    return values


def calibration_extras(ctx: TensorContext, key: str, what: str, n: int) -> list[Tensor] | None:
    """Each model's calibration statistic `key` for this tensor (None when no model has one); one line when only
    some models have it, since a merge weighted by it would silently treat the others as unweighted."""
    found = ctx.extras.get(key)
    if found is None or all(f is None for f in found):
        return None
    if len(found) != n:
        raise SpliceError(f"{ctx.name}: a {what} for {len(found)} models, but {n} models to merge")
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        raise SpliceError(f"{ctx.name}: no {what} for model(s) {missing} (the others have one); "
                          f"calibrate every model on the same data")
    return found


def model_weights(tensors: Sequence[Tensor], weight: Sequence[float] | None, ctx: TensorContext) -> list[float]:
    """Per-model weights (default 1) after checking there are inputs, one weight each, and equal shapes."""
    if not tensors:
        raise SpliceError(f"{ctx.name}: no input tensors to merge")
    weights = [1.0] * len(tensors) if weight is None else [float(w) for w in weight]
    if len(weights) != len(tensors):
        raise SpliceError(f"{ctx.name}: {len(weights)} weights for {len(tensors)} models")
    for t in tensors:
        if t.shape != tensors[0].shape:
            raise SpliceError(f"{ctx.name}: input shapes differ ({tuple(t.shape)} vs {tuple(tensors[0].shape)})")
    return weights


def in_range(method: str, name: str, values: float | Sequence[float], lo: float, hi: float,
             ctx: TensorContext | None = None) -> None:
    """Raise unless every value lies in the closed interval [lo, hi]."""
    for v in [values] if isinstance(values, (int, float)) else values:
        if not lo <= v <= hi:
            raise SpliceError(f"{method}: parameter {name!r} must be in [{lo}, {hi}]{where(ctx)}, got {v}")


def bind(method: str, schema: dict[str, Param], model_schema: dict[str, Param], given: dict[str, Any], n: int,
         ctx: TensorContext | None = None) -> dict[str, Any]:
    """Fill defaults, reject unknown and missing parameters, and expand per-model ones to lists of `n` values."""
    known = {**schema, **model_schema}
    for key in given:
        if key not in known:
            raise SpliceError(f"{method}: unknown parameter {key!r}{closest(key, known)}; "
                              f"known: {', '.join(sorted(known))}")
    out: dict[str, Any] = {}
    for key, p in known.items():
        if key in given:
            value = given[key]
        elif p.required:
            raise SpliceError(f"{method}: parameter {key!r} is required{where(ctx)}")
        else:
            value = p.default
        out[key] = per_model(method, key, value, n, ctx) if key in model_schema else value
    return out


def need_base(method: str, base: Tensor | None, ctx: TensorContext | None = None) -> Tensor:
    if base is None:
        raise SpliceError(f"{method}: needs a base model{where(ctx)}")
    return base


def count(method: str, tensors: Sequence[Tensor], lo: int, hi: int | None = None,
          ctx: TensorContext | None = None, what: str = "models") -> None:
    """Raise unless lo <= len(tensors) <= hi (hi=None: no upper bound)."""
    n = len(tensors)
    if n < lo or (hi is not None and n > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        raise SpliceError(f"{method}: takes {want} {what}{where(ctx)}, got {n}")


def same_shapes(method: str, tensors: Sequence[Tensor | None], ctx: TensorContext | None = None) -> None:
    shapes = [tuple(t.shape) for t in tensors if t is not None]
    if any(s != shapes[0] for s in shapes):
        raise SpliceError(f"{method}: inputs have different shapes{where(ctx)}: {shapes}")


def work_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The promoted dtype of the inputs (what mergekit aligns a tensor group to before merging)."""
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    assert dtype is not None
    return dtype
