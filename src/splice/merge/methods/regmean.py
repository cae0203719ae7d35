"""RegMean: dataless knowledge fusion by merging linear-layer weights (Jin et al., ICLR 2023),
https://arxiv.org/abs/2212.09849

For a linear layer y = W x (W of shape (out, in)) fine-tuned into W_i on data X_i (rows are inputs), RegMean picks
the W that best reproduces every model's outputs on its own data,

    min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²   ⇒   W* = (Σ_i W_i G_i)(Σ_i G_i)⁻¹,   G_i = X_iᵀ X_i,

so only the Gram matrices G_i of each layer's inputs are needed, never the data. To regularise toward the simple
average, the off-diagonal entries of every G_i are scaled by α ("reduce non-diagonal"):

    G̃_i = α G_i + (1 − α) diag(G_i).

α = 1 is the exact least-squares merge; α = 0 leaves only diag(G_i), a per-input-feature average of the columns of
W_i weighted by how much each model's data used that feature. Tensors that are not linear weights (biases, norms,
embeddings: no Gram for them) are averaged, as in the paper. The Grams come from
`splice.merge.calibration.compute_gram` via ``ctx.extras["gram"]``.

Choices where the paper leaves a detail open:
- α defaults to 0.9 (within the range the paper found best on its tasks).
- A relative ridge ``epsilon`` · mean(diag Σ G̃_i) (default 1e-6) is added to each model's G̃_i in proportion to its
  weight, so an input feature that no calibration data ever used (a zero row/column of every G_i) takes the
  weighted average of the models' columns instead of an arbitrary value; the solve runs in float64.
- A per-model ``weight`` multiplies G_i (how much that model's data counts) and the fallback average.
- Layout: nn.Linear stores W as (out, in); HF `Conv1D` (GPT-2) stores (in, out). The Gram (in, in) tells the two
  apart for non-square weights; for square ones the merge plan says which weights are Conv1D (from the model's
  architecture), and ``layout`` ("out_in" default) decides only where it cannot tell (a custom architecture).
"""
from __future__ import annotations

import torch
from torch import Tensor

from splice.errors import SpliceError, closest
from splice.merge.methods.fisher import weighted_average
from splice.merge.methods._common import calibration_extras, model_weights
from splice.merge.methods.registry import Param, TensorContext, merge_method

LAYOUTS = ("out_in", "in_out")


def reduce_non_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """α G + (1 − α) diag(G): the off-diagonal entries scaled by α."""
    diag = torch.diagonal(gram)
    return gram * alpha + torch.diag_embed(diag * (1.0 - alpha))


def regmean_solve(weights: list[Tensor], grams: list[Tensor], *, alpha: float = 0.9,
                  model_weights: list[float] | None = None, epsilon: float = 1e-6) -> Tensor:
    """W* = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹ for linear weights W_i of shape (out, in) and Grams (in, in); float64."""
    model_weights = [1.0] * len(weights) if model_weights is None else model_weights
    gs = [reduce_non_diagonal(g.double(), alpha) * w for g, w in zip(grams, model_weights)]
    total = sum(gs)
    rhs = sum(w.double() @ g for w, g in zip(weights, gs))
    scale = float(torch.diagonal(total).mean()) if total.numel() else 0.0
    mass = sum(model_weights)
    if epsilon > 0 and scale > 0 and mass > 0:
        # Adding ridge·w_i·I to every G̃_i pulls directions no data reached to the weighted average Σ w_i W_i / Σ w_i.
        ridge = epsilon * scale / mass
        eye = torch.eye(total.shape[0], dtype=total.dtype, device=total.device)
        total = total + (ridge * mass) * eye
        rhs = rhs + ridge * sum(w.double() * mw for w, mw in zip(weights, model_weights))
    try:
        return torch.linalg.solve(total, rhs.T).T  # total is symmetric: W* = rhs · total⁻¹
    except RuntimeError:  # singular (no ridge, or no data at all): the minimum-norm least-squares solution
        return (torch.linalg.pinv(total, hermitian=True) @ rhs.T).T


@merge_method(
    "regmean",
    space="weights",
    reference="https://arxiv.org/abs/2212.09849",
    params={
        "alpha": Param(float, 0.9, help="scale of the off-diagonal Gram entries (1: exact least squares)"),
        "epsilon": Param(float, 1e-6, help="relative ridge toward the average for unused input features"),
        "layout": Param(str, "out_in", help="layout of square weights: out_in (nn.Linear) or in_out (Conv1D)"),
    },
    model_params={"weight": Param(float, 1.0, help="how much this model's calibration data counts")},
    needs={"gram"},
)
def regmean(base: Tensor | None, tensors: list[Tensor], *, ctx: TensorContext, alpha: float = 0.9,
            epsilon: float = 1e-6, layout: str = "out_in", weight: list[float] | None = None,
            **_: object) -> Tensor:
    """RegMean for linear weights with Grams; the weighted average for every other tensor."""
    if not tensors:
        raise SpliceError(f"{ctx.name}: no input tensors to merge")
    if layout not in LAYOUTS:
        raise SpliceError(f"regmean layout {layout!r} is not one of {', '.join(LAYOUTS)}{closest(layout, LAYOUTS)}")
    if not 0.0 <= alpha <= 1.0:
        raise SpliceError(f"regmean alpha must be in [0, 1], got {alpha}")
    weights = model_weights(tensors, weight, ctx)
    grams = calibration_extras(ctx, "gram", "Gram matrix", len(tensors))
    if grams is None or tensors[0].dim() != 2:
        return weighted_average(tensors, weights).to(tensors[0].dtype)
    layout = (ctx.extras.get("layout") or [layout])[0]  # the plan knows which weights are Conv1D
    n_in = grams[0].shape[0]
    for i, g in enumerate(grams):
        if g.dim() != 2 or g.shape != (n_in, n_in):
            raise SpliceError(f"{ctx.name}: Gram matrix of model {i} has shape {tuple(g.shape)}, expected "
                              f"({n_in}, {n_in})")
    out_in = tensors[0].shape[1] == n_in and (tensors[0].shape[0] != n_in or layout == "out_in")
    if not out_in and tensors[0].shape[0] != n_in:
        raise SpliceError(f"{ctx.name}: weight of shape {tuple(tensors[0].shape)} does not fit a Gram matrix over "
                          f"{n_in} inputs")
    ws = [t.to(grams[0].device) if out_in else t.to(grams[0].device).T for t in tensors]
    merged = regmean_solve(ws, list(grams), alpha=alpha, model_weights=weights, epsilon=epsilon)
    merged = merged if out_in else merged.T
    return merged.to(device=tensors[0].device, dtype=tensors[0].dtype)
