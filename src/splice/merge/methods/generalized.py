"""Generalized task arithmetic: task arithmetic, TIES, DARE, breadcrumbs and DELLA as one primitive with two knobs.

With task vectors τ_i = θ_i − θ_0, per-model weights w_i, and a global scale λ (mergekit's ``lambda``):

    τ̃_i = sparsify(τ_i; density_i, …)                       # knob 1: none | magnitude | random | …  (sparsify.py)
    m_i = [sign(w_i τ̃_i) = s]   with s = elected sign           # knob 2: consensus none (m_i = 1) | sum | count
    τ   = λ · Σ_i m_i w_i τ̃_i / D,   D = Σ_i m_i w_i if normalize else 1
    θ   = θ_0 + τ                                               # (the executor adds θ_0; methods return τ)

Sign election, per entry: ``sum`` (TIES) takes s = sign(Σ_i w_i τ̃_i), the sign with the larger total mass;
``count`` takes the sign held by more models. Ties go to +. An entry a model does not hold (zero after trimming)
never agrees, so its weight is left out of D: TIES's "disjoint mean". Where D = 0 it is replaced by 1 (with
consensus: exactly 0; without: |D| < 1e-8).

Registered variants (same defaults as mergekit 0.1.5, ``merge_methods/registry.py``):

================  ==========================  =========  =========  =======  ===================================
name              sparsify                    consensus  normalize  rescale  paper
================  ==========================  =========  =========  =======  ===================================
task_arithmetic   none                        none       False      False    https://arxiv.org/abs/2212.04089
ties              magnitude                   sum        True       False    https://arxiv.org/abs/2306.01708
dare_linear       random                      none       False      True     https://arxiv.org/abs/2311.03099
dare_ties         random                      sum        False      True     https://arxiv.org/abs/2311.03099
breadcrumbs       magnitude_outliers          none       False      False    https://arxiv.org/abs/2312.06795
breadcrumbs_ties  magnitude_outliers          sum        False      False    https://arxiv.org/abs/2312.06795
della             rank_magnitude_sampling     sum        True       True     https://arxiv.org/abs/2406.11617
della_linear      rank_magnitude_sampling     none       False      True     https://arxiv.org/abs/2406.11617
================  ==========================  =========  =========  =======  ===================================

plus ``generalized_task_arithmetic``, which takes ``sparsify`` and ``consensus`` as parameters. Every variant takes
per-model ``weight`` (required) and ``density`` (default 1), global ``normalize``, ``rescale``, ``int8_mask`` and
``lambda``; the breadcrumbs variants add per-model ``gamma`` (0.01), the DELLA variants per-model ``epsilon`` (0.15).
As in mergekit, ``density``/``rescale`` are accepted but unused when nothing is sparsified, and ``int8_mask`` only
changes the dtype of the sign mask (a memory saving), never the result.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.merge.methods import _common as c
from splice.merge.methods.registry import Param, TensorContext, merge_method
from splice.merge.methods.sparsify import SPARSIFY_METHODS, sparsify
from splice.merge.methods.sparsify_blocks import BlockSparsifier

CONSENSUS_METHODS: tuple[str, ...] = ("none", "sum", "count")


def consensus_mask(deltas: Tensor, method: str, mask_dtype: torch.dtype | None = None) -> Tensor:
    """Which entries agree with the elected sign: a bool mask shaped like `deltas` (N, *shape).

    Args:
        deltas: the weighted (sparsified) task vectors, stacked on dim 0.
        method: "sum" elects the sign of the summed deltas (TIES); "count" the sign held by more models.
        mask_dtype: dtype of the intermediate sign tensor (int8 saves memory; the result does not change).
    """
    sign = deltas.sign().to(mask_dtype or deltas.dtype)  # (N, *shape) in {-1, 0, 1}
    if method == "sum":
        votes = deltas.sum(dim=0)
    elif method == "count":
        votes = sign.sum(dim=0)
    else:
        raise SpliceError(f"parameter 'consensus' must be one of {', '.join(CONSENSUS_METHODS)}, got {method!r}")
    elected = (votes >= 0).to(sign.dtype) * 2 - 1  # (*shape): +1 on a tie
    return sign == elected


def elected_sign(deltas: list[Tensor], method: str) -> Tensor:
    """The elected sign per entry (int8, +1 on a tie) of a list of weighted deltas, without stacking them."""
    votes = torch.zeros_like(deltas[0])
    for d in deltas:
        if method == "sum":
            votes.add_(d)
        elif method == "count":
            votes.add_(d.sign())
        else:
            raise SpliceError(f"parameter 'consensus' must be one of {', '.join(CONSENSUS_METHODS)}, got {method!r}")
    return (votes >= 0).to(torch.int8) * 2 - 1


def generalized_task_arithmetic(
    base: Tensor, deltas: list[Tensor], *, weight: list[float], density: list[float] | None = None,
    sparsify_method: str = "none", consensus: str = "none", gamma: list[float] | None = None,
    epsilon: list[float] | None = None, normalize: bool = False, rescale: bool = False, int8_mask: bool = False,
    scale: float = 1.0, generator: torch.Generator | None = None,
) -> Tensor:
    """The merged task vector λ · Σ m_i w_i sparsify(τ_i) / D (see the module docstring).

    Args:
        base: θ_0, for shape and dtype (the deltas already have it subtracted).
        deltas: τ_i, one per model, each shaped like `base`. The list is consumed (its entries replaced by
            intermediate results); the tensors in it are not modified.
        weight, density, gamma, epsilon: per-model values aligned with `deltas`.
        sparsify_method: one of sparsify.SPARSIFY_METHODS.
        consensus: "none", "sum" or "count".
        normalize: divide by the (agreeing) weight sum D.
        rescale: keep each sparsified delta's L1 norm.
        int8_mask: build the sign mask in int8.
        scale: λ, applied last.
        generator: the only randomness (DARE, DELLA).

    Returns:
        The merged delta, shaped like `base`, in the inputs' promoted dtype.
    """
    n = len(deltas)
    if n == 0:
        return torch.zeros_like(base)
    dtype = c.work_dtype(base, *deltas)
    density = density or [1.0] * n
    # No (N, *shape) stack: the largest tensors (embeddings) bound a merge's memory. Each input's weighted, sparsified
    # version replaces it in the list (the tensors passed in are never written), so an input is freed as soon as it
    # is used when the caller keeps no other reference: the executor does not.
    w = torch.tensor(weight, dtype=dtype, device=base.device)  # (N,)
    for i in range(n):
        given = deltas[i]
        t = sparsify(given.to(dtype), sparsify_method, density[i], gamma=gamma[i] if gamma else 0.01,
                     epsilon=epsilon[i] if epsilon else 0.15, rescale=rescale, generator=generator)
        t = t * w[i] if t.untyped_storage().data_ptr() == given.untyped_storage().data_ptr() else t.mul_(w[i])
        del given
        deltas[i] = t
    return _combine(deltas, weight, w, consensus, normalize, scale, dtype)


def _combine(deltas: list[Tensor], weight: list[float], w: Tensor, consensus: str, normalize: bool, scale: float,
             dtype: torch.dtype) -> Tensor:
    """λ · Σ m_i d_i / D of the weighted, sparsified deltas `d_i` (consumed): sign consensus and the sum, elementwise."""
    n = len(deltas)
    if consensus != "none":
        elected = elected_sign(deltas, consensus)  # (*shape) int8; int8_mask changes nothing here
        merged, divisor = torch.zeros_like(deltas[0]), torch.zeros_like(deltas[0])
        for i in range(n):
            agree = deltas[i].sign().to(torch.int8) == elected
            merged.add_(deltas[i].mul_(agree))
            divisor.add_(agree.to(dtype), alpha=weight[i])
            deltas[i] = None  # type: ignore[call-overload]
        divisor[divisor == 0] = 1
    else:
        merged = deltas[0]  # already a new tensor (the weighted copy), so it can take the sum in place
        for i in range(1, n):
            merged.add_(deltas[i])
        divisor = w.sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones((), dtype=dtype)
    if normalize:
        merged /= divisor
    if scale != 1:
        merged *= scale
    return merged


def generalized_blocks(source: Any, *, weight: list[float], density: list[float] | None = None,
                       sparsify_method: str = "none", consensus: str = "none", gamma: list[float] | None = None,
                       epsilon: list[float] | None = None, normalize: bool = False, rescale: bool = False,
                       int8_mask: bool = False, scale: float = 1.0, generator: torch.Generator | None = None,
                       ) -> Iterator[tuple[slice, Tensor]]:
    """`generalized_task_arithmetic` on a large float32 tensor read in row blocks (`source`: see
    `splice.merge.blocks.BlockSource`): per-model statistics passes (sparsify_blocks.py), then one emitting pass
    that yields (rows, merged delta of those rows). Same masks and sign elections as the whole-tensor function."""
    n = source.count
    if n == 0:  # only the base feeds this tensor (a slice of the base alone): no delta, as the whole function says
        for rows, _ in source.blocks():
            yield rows, torch.zeros_like(source.base_block(rows))
        return
    density = density or [1.0] * n
    sparsifiers = [BlockSparsifier(sparsify_method, density[i], n=source.numel, gamma=gamma[i] if gamma else 0.01,
                                   epsilon=epsilon[i] if epsilon else 0.15, rescale=rescale) for i in range(n)]
    for i, sp in enumerate(sparsifiers):  # model by model, so random draws come in the whole version's order
        sp.prepare(lambda i=i: source.model_blocks(i), generator)
    for sp in sparsifiers:
        sp.begin()
    w = torch.tensor(weight, dtype=torch.float32)
    for rows, blocks in source.blocks():
        deltas = []
        for i, (sp, given) in enumerate(zip(sparsifiers, blocks)):
            t = sp.apply(given)
            deltas.append(t * w[i] if t is given else t.mul_(w[i]))
        yield rows, _combine(deltas, weight, w, consensus, normalize, scale, torch.float32)


def _variant(name: str, sparsify_method: str | None, consensus: str | None, normalize: bool, rescale: bool,
             reference: str, doc: str) -> Callable[..., Tensor]:
    """Register one named point of the sparsify × consensus grid (None: the knob is a parameter)."""
    params = {
        "normalize": Param(bool, normalize, help="divide by the sum of the (agreeing) weights"),
        "rescale": Param(bool, rescale, help="rescale sparsified deltas to keep their L1 norm"),
        "int8_mask": Param(bool, False, help="build the sign mask in int8 (saves memory, same result)"),
        "lambda": Param(float, 1.0, help="global scale of the merged delta"),
    }
    if sparsify_method is None:
        params["sparsify"] = Param(str, "none", help=f"one of {', '.join(SPARSIFY_METHODS)}")
    if consensus is None:
        params["consensus"] = Param(str, "none", help=f"one of {', '.join(CONSENSUS_METHODS)}")
    model_params = {
        "weight": Param(float, required=True, help="weight of this model's delta"),
        "density": Param(float, 1.0, help="fraction of the delta's entries to keep"),
    }
    if sparsify_method in ("magnitude_outliers", None):
        model_params["gamma"] = Param(float, 0.01, help="fraction of largest-magnitude outliers to drop")
    if sparsify_method in ("rank_magnitude_sampling", None):
        model_params["epsilon"] = Param(float, 0.15, help="keep probability spans density ± epsilon by rank")

    def arguments(given: dict[str, Any], n: int, ctx: TensorContext | None) -> dict[str, Any]:
        p = c.bind(name, params, model_params, given, n, ctx)
        method = p.get("sparsify", sparsify_method)
        agree = p.get("consensus", consensus)
        if method not in SPARSIFY_METHODS:
            raise SpliceError(f"{name}: parameter 'sparsify' must be one of {', '.join(SPARSIFY_METHODS)}, "
                              f"got {method!r}")
        if agree not in CONSENSUS_METHODS:
            raise SpliceError(f"{name}: parameter 'consensus' must be one of {', '.join(CONSENSUS_METHODS)}, "
                              f"got {agree!r}")
        c.in_range(name, "density", p["density"], 0.0, 1.0, ctx)
        for key in ("gamma", "epsilon"):
            if key in p:
                c.in_range(name, key, p[key], 0.0, 1.0, ctx)
        return dict(weight=p["weight"], density=p["density"], sparsify_method=method, consensus=agree,
                    gamma=p.get("gamma"), epsilon=p.get("epsilon"), normalize=p["normalize"], rescale=p["rescale"],
                    int8_mask=p["int8_mask"], scale=p["lambda"], generator=ctx.generator if ctx else None)

    def fn(base: Tensor, deltas: list[Tensor], *, ctx: TensorContext | None = None, **given: Any) -> Tensor:
        args = arguments(given, len(deltas), ctx)
        c.same_shapes(name, [base, *deltas], ctx)
        try:
            return generalized_task_arithmetic(base, deltas, **args)
        except SpliceError as e:
            raise SpliceError(f"{name}: {e}{c.where(ctx)}") from None

    def blocks(source: Any, *, ctx: TensorContext | None = None, **given: Any) -> Iterator[tuple[slice, Tensor]]:
        args = arguments(given, source.count, ctx)
        try:
            yield from generalized_blocks(source, **args)
        except SpliceError as e:
            raise SpliceError(f"{name}: {e}{c.where(ctx)}") from None

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return merge_method(name, space="delta", reference=reference, params=params, model_params=model_params,
                        blocks=blocks)(fn)


task_arithmetic = _variant(
    "task_arithmetic", "none", "none", False, False, "https://arxiv.org/abs/2212.04089",
    """Task arithmetic (Ilharco et al., https://arxiv.org/abs/2212.04089): τ = λ Σ_i w_i τ_i.""")
ties = _variant(
    "ties", "magnitude", "sum", True, False, "https://arxiv.org/abs/2306.01708",
    """TIES-merging (Yadav et al., https://arxiv.org/abs/2306.01708): trim each τ_i to its top-`density` magnitudes,
    elect a sign per entry by total mass, and average the agreeing entries (disjoint mean).""")
dare_linear = _variant(
    "dare_linear", "random", "none", False, True, "https://arxiv.org/abs/2311.03099",
    """DARE (Yu et al., https://arxiv.org/abs/2311.03099): drop each entry of τ_i with probability 1 − density,
    rescale the survivors (L1-preserving, ≈ 1/density), then task arithmetic.""")
dare_ties = _variant(
    "dare_ties", "random", "sum", False, True, "https://arxiv.org/abs/2311.03099",
    """DARE-TIES (https://arxiv.org/abs/2311.03099 with https://arxiv.org/abs/2306.01708): DARE's random drop and
    rescale, then TIES's sign election.""")
breadcrumbs = _variant(
    "breadcrumbs", "magnitude_outliers", "none", False, False, "https://arxiv.org/abs/2312.06795",
    """Model Breadcrumbs (Davari & Belilovsky, https://arxiv.org/abs/2312.06795): drop the `gamma` largest-magnitude
    outliers and the smallest entries of each τ_i, keeping `density`, then task arithmetic.""")
breadcrumbs_ties = _variant(
    "breadcrumbs_ties", "magnitude_outliers", "sum", False, False, "https://arxiv.org/abs/2312.06795",
    """Model Breadcrumbs (https://arxiv.org/abs/2312.06795) followed by TIES's sign election.""")
della = _variant(
    "della", "rank_magnitude_sampling", "sum", True, True, "https://arxiv.org/abs/2406.11617",
    """DELLA-merging (Deep et al., https://arxiv.org/abs/2406.11617): MAGPRUNE drops entries with a probability that
    falls with their magnitude rank (keep p ∈ [density − ε, density + ε]), rescales, elects signs, averages.""")
della_linear = _variant(
    "della_linear", "rank_magnitude_sampling", "none", False, True, "https://arxiv.org/abs/2406.11617",
    """DELLA's MAGPRUNE (https://arxiv.org/abs/2406.11617) without sign election: a weighted sum of pruned deltas.""")
generalized = _variant(
    "generalized_task_arithmetic", None, None, False, False, "https://arxiv.org/abs/2306.01708",
    """Generalized task arithmetic with both knobs open: `sparsify` ∈ {none, magnitude, random, magnitude_outliers,
    rank_magnitude_sampling} × `consensus` ∈ {none, sum, count} (see https://arxiv.org/abs/2306.01708 for the
    trim / elect / disjoint-merge steps it generalizes).""")
