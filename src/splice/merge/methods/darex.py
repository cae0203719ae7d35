"""DAREx-q: DARE with a corrected rescaling factor (Deng et al., ICLR 2025), https://arxiv.org/abs/2410.09344

DARE keeps each delta parameter with probability 1 − p and rescales the survivors by 1/(1 − p), which is unbiased
but, at extreme drop rates (p = 0.99: a factor of 100), blows up the variance of every layer's output change.
DAREx-q rescales by 1/q instead, with q ∈ [1 − p, 1], chosen to make the pruned layer's output change small:

    τ̃ = (m ∘ τ) / q,   m_j ~ Bernoulli(1 − p).

The paper picks q by validation accuracy, or by the output change on a batch of unlabelled data (its analytical
per-layer q uses the mean input activation x̄ through c = τ ∘ x̄). This module implements a *data-free* variant,
our derivation of the paper's criterion, that needs no data and no model:

For a weight τ (rows = outputs, the nn.Linear layout; 1-D tensors are one row) and inputs x with second moment
M = E[x xᵀ], the output change of row r is e_r = Σ_j (m_j/q − 1) τ_rj x_j, and over the random mask

    E‖e‖² = (c(1 − p) − 1)² · A + c² · p(1 − p) · B,   c = 1/q,
    A = tr(τ M τᵀ),  B = Σ_j M_jj ‖τ_{:,j}‖²,

minimised at  q* = (1 − p) + p · B / A,  clipped to [1 − p, 1] (the paper's search range for q).

With no data we take the constant input x = 1 (M = 11ᵀ), the "mean" component of a layer's input: then A = Σ_r
(Σ_j τ_rj)² (squared row sums) and B = ‖τ‖². A delta whose rows have a consistent mean (coherent row sums) keeps
DARE's 1/(1 − p); a delta whose entries cancel in every row gets a factor near 1. Either way the expected squared
error of the row sums is never larger than DARE's (DARE's factor lies in the same range), and the norm of τ̃ is
far closer to ‖τ‖ than DARE's ‖τ‖/√(1 − p). DARE is unbiased for the row sums in expectation; DAREx trades a bias
toward 0 for a large cut in variance, which is the paper's point. (With M = I, isotropic inputs, q* = 1.)

Options (global params):
- ``q``: a fixed q (e.g. tuned on validation data, the paper's DAREx-q with labels); overrides ``q_mode``.
- ``q_mode``: "output" (default, the rule above), "norm" (1/q = ‖τ‖/‖m ∘ τ‖ for the drawn mask, so the pruned
  delta keeps the norm of the original exactly, also clipped to [1 − p, 1]), or "dare" (1/(1 − p), plain DARE).
`darex_q` accepts any second moment M (e.g. a calibration Gram matrix XᵀX), for a data-driven q.

Per-model ``density`` (1 − p, required, as in mergekit's DARE) and ``weight``; the merge is Σ_i w_i τ̃_i · λ.
DAREx-L2 (AdamR, a fine-tuning regulariser) acts during training and is not a merge method.
"""
from __future__ import annotations

import torch
from torch import Tensor

from splice.errors import SpliceError, closest
from splice.merge.methods.registry import Param, TensorContext, merge_method

Q_MODES = ("output", "norm", "dare")


def _rows(t: Tensor) -> Tensor:
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)


def darex_q(delta: Tensor, density: float, second_moment: Tensor | None = None) -> float:
    """The q minimising the expected output change E‖e‖² of dropping `delta` at keep rate `density`.

    Args:
        delta: the task vector of one tensor; rows are outputs (nn.Linear layout), 1-D tensors are one row.
        density: the keep probability 1 − p.
        second_moment: M = E[x xᵀ] (in, in) of the inputs, or any multiple of it (a Gram matrix XᵀX); None means
            the data-free constant input x = 1.

    Returns:
        q in [density, 1].
    """
    p = 1.0 - density
    rows = _rows(delta).double()
    if second_moment is None:
        a = rows.sum(dim=1).pow(2).sum()  # tr(τ 11ᵀ τᵀ): squared row sums
        b = rows.pow(2).sum()
    else:
        m = second_moment.double()
        if m.shape != (rows.shape[1], rows.shape[1]):
            raise SpliceError(f"second moment of shape {tuple(m.shape)} does not fit a delta with {rows.shape[1]} "
                              f"inputs per row")
        a = (rows @ m * rows).sum()
        b = (rows.pow(2) * torch.diagonal(m)).sum()
    if a <= 0:  # no coherent output to preserve: rescaling can only add error
        return 1.0
    q = density + p * float(b / a)
    return min(max(q, density), 1.0)


def darex_drop(delta: Tensor, density: float, generator: torch.Generator | None, *, q: float | None = None,
               q_mode: str = "output") -> Tensor:
    """One task vector dropped at keep rate `density` and rescaled by 1/q (float32)."""
    t = delta.float()
    if density >= 1.0:
        return t.clone()
    gen_device = generator.device if generator is not None else torch.device("cpu")
    keep = torch.rand(t.shape, generator=generator, device=gen_device).to(t.device) < density
    kept = t * keep
    if q is None:
        if q_mode == "dare":
            q = density
        elif q_mode == "norm":
            norm_kept = float(kept.double().norm())
            q = density if norm_kept == 0 else min(max(norm_kept / float(t.double().norm()), density), 1.0)
        else:
            q = darex_q(t, density)
    return kept / q


@merge_method(
    "darex",
    space="delta",
    reference="https://arxiv.org/abs/2410.09344",
    params={
        "q": Param(float, None, help="fixed rescaling 1/q (e.g. tuned on validation data); default: per tensor"),
        "q_mode": Param(str, "output", help="data-free choice of q: output (min. output change), norm, dare"),
        "lambda": Param(float, 1.0, help="scale of the merged task vector"),
    },
    model_params={
        "density": Param(float, None, required=True, help="keep probability 1 - p of the delta parameters"),
        "weight": Param(float, 1.0, help="weight of this model's pruned task vector"),
    },
)
def darex(base: Tensor, tensors: list[Tensor], *, ctx: TensorContext, density: list[float],
          weight: list[float] | None = None, q: float | None = None, q_mode: str = "output", **params) -> Tensor:
    """Σ_i w_i · DAREx(τ_i): each task vector randomly dropped and rescaled by 1/q, q chosen per tensor."""
    lam = float(params.get("lambda", 1.0))
    if not tensors:
        raise SpliceError(f"{ctx.name}: no input tensors to merge")
    if q_mode not in Q_MODES:
        raise SpliceError(f"darex q_mode {q_mode!r} is not one of {', '.join(Q_MODES)}{closest(q_mode, Q_MODES)}")
    densities = [float(d) for d in (density if isinstance(density, (list, tuple)) else [density] * len(tensors))]
    weights = [1.0] * len(tensors) if weight is None else [float(w) for w in weight]
    if len(densities) != len(tensors) or len(weights) != len(tensors):
        raise SpliceError(f"{ctx.name}: {len(densities)} densities and {len(weights)} weights for "
                          f"{len(tensors)} models")
    # Reproducible even when called outside the executor (which seeds ctx.generator per tensor name).
    gen = ctx.generator if ctx.generator is not None else torch.Generator().manual_seed(0)
    total = None
    for i, (t, d, w) in enumerate(zip(tensors, densities, weights)):
        if not 0.0 < d <= 1.0:
            raise SpliceError(f"{ctx.name}: darex density of model {i} must be in (0, 1], got {d}")
        if q is not None and not d <= q <= 1.0:
            raise SpliceError(f"{ctx.name}: darex q must be in [density, 1] = [{d}, 1], got {q}")
        if t.shape != tensors[0].shape:
            raise SpliceError(f"{ctx.name}: input shapes differ ({tuple(t.shape)} vs {tuple(tensors[0].shape)})")
        term = darex_drop(t, d, gen, q=q, q_mode=q_mode) * w
        total = term if total is None else total + term
    return (lam * total).to(tensors[0].dtype)

