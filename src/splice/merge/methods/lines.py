"""LiNeS: Layer-increasing Network Scaling (Wang et al., ICLR 2025), https://arxiv.org/abs/2410.17146

LiNeS edits a task vector (one fine-tune's, or a merged multi-task one) after training: the update of transformer
block ℓ ∈ {0, …, L−1} is scaled by a factor that grows linearly with depth,

    λ(ℓ) = α + β · ℓ / (L − 1),

so the shallow blocks, which hold general features, stay near the pre-trained weights (less forgetting, less
interference between tasks) and the deep blocks keep their task-specific updates. The ``lines`` method here is task
arithmetic followed by LiNeS: τ = λ(ℓ) · Σ_i w_i τ_i.

Choices where the paper leaves a detail open (all from the authors' code, github.com/wang-kee/LiNeS, unless said):

- Tensors outside the transformer blocks (embeddings, final norm, output head; ``ctx.layer`` is None) get α, the
  same factor as the first block — the authors' ``layer_scalings_dict.get(k, alpha)``.
- A model with a single block (L = 1) has ℓ/(L − 1) taken as 0, so its block gets α.
- α defaults to 1/T for T merged models: the authors' multi-task rule α = (‖Σ τ_t‖ / ‖τ_MTL‖) · 1/T, whose norm
  ratio is 1 when the merged vector is the task-arithmetic sum, as it is here. (The ratio is a whole-model quantity,
  which a per-tensor method cannot see, so we do not compute it for other merges.)
- β defaults to 1 − α (our choice; the paper tunes β on held-out data): the first block gets the task average, the
  last block the plain task-arithmetic sum. For a single model this default is the identity; the paper's
  single-task edit is α = λ, β = 1 − λ, so give ``alpha`` (e.g. 0.5) to use LiNeS against forgetting.

`lines_scale` is exported so that other delta methods can apply the same depth schedule as a knob.
"""
from __future__ import annotations

from torch import Tensor

from splice.errors import SpliceError
from splice.merge.methods.registry import Param, TensorContext, merge_method


def lines_scale(ctx: TensorContext, alpha: float, beta: float) -> float:
    """The LiNeS factor α + β·ℓ/(L−1) for the tensor in `ctx`; α for tensors outside the transformer blocks."""
    if ctx.layer is None or ctx.num_layers is None:
        return float(alpha)
    if not 0 <= ctx.layer < ctx.num_layers:
        raise SpliceError(f"{ctx.name}: layer index {ctx.layer} is outside the model's {ctx.num_layers} layers")
    depth = ctx.layer / (ctx.num_layers - 1) if ctx.num_layers > 1 else 0.0
    return float(alpha) + float(beta) * depth


@merge_method(
    "lines",
    space="delta",
    reference="https://arxiv.org/abs/2410.17146",
    params={
        "alpha": Param(float, None, help="factor of the first block and of non-block tensors (default 1/num_models)"),
        "beta": Param(float, None, help="factor added at the last block (default 1 - alpha)"),
    },
    model_params={"weight": Param(float, 1.0, help="task-arithmetic weight of this model's task vector")},
)
def lines(base: Tensor, tensors: list[Tensor], *, ctx: TensorContext, alpha: float | None = None,
          beta: float | None = None, weight: list[float] | None = None, **_: object) -> Tensor:
    """Task arithmetic Σ w_i τ_i, scaled by the LiNeS factor of this tensor's depth."""
    if not tensors:
        raise SpliceError(f"{ctx.name}: no input tensors to merge")
    weights = [1.0] * len(tensors) if weight is None else [float(w) for w in weight]
    if len(weights) != len(tensors):
        raise SpliceError(f"{ctx.name}: {len(weights)} weights for {len(tensors)} models")
    a = 1.0 / len(tensors) if alpha is None else float(alpha)
    b = 1.0 - a if beta is None else float(beta)
    total = None
    for w, t in zip(weights, tensors):
        if t.shape != tensors[0].shape:
            raise SpliceError(f"{ctx.name}: input shapes differ ({tuple(t.shape)} vs {tuple(tensors[0].shape)})")
        term = t.float() * w
        total = term if total is None else total + term
    return (total * lines_scale(ctx, a, b)).to(tensors[0].dtype)
