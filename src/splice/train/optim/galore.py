"""GaLore: gradient low-rank projection (Zhao et al. 2024, https://arxiv.org/abs/2403.03507).

Full-parameter training whose optimizer state lives in a low-rank subspace of each weight matrix's gradient. For a
matrix W (m × n) with gradient G_t, every T steps (`update_proj_gap`) the projection is refreshed from the SVD
G_t = U S Vᵀ, on the smaller side (the paper's choice, which keeps the state smallest):

    m ≥ n:  Q = V[:, :r] (n × r),   R_t = G_t Q          (m × r)
    m < n:  P = U[:, :r] (m × r),   R_t = Pᵀ G_t         (r × n)

Adam runs on R_t (moments M_t, V_t of R_t's shape), and its normalised step is projected back and scaled by α:

    N_t = M̂_t / (√V̂_t + ε),   W ← W − η α · N_t Qᵀ   (or  W ← W − η α · P N_t),   W ← W − η λ W (decoupled decay)

Optimizer state per projected matrix: r · (2 · max(m, n) + min(m, n)) numbers (two moments and the projection)
instead of AdamW's 2 m n. The moments carry over when the subspace is refreshed, as in the paper's Algorithm 2.
Gradients are still computed in full. Projected: every 2-D trained parameter inside the model's repeated layers
(the paper projects the attention and MLP matrices, not the embeddings or the head) whose smaller side exceeds r;
every other parameter gets plain AdamW in the same optimizer (bit-identical to torch.optim.AdamW).

Defaults: rank 8 and scale α = 4 are the paper's GLUE fine-tuning setting (RoBERTa-base at lr 3e-5; the setting
closest to fine-tuning a BERT encoder); its pre-training runs used rank 128–512 with α = 0.25 at lr 1e-2.
`update_proj_gap` 200 is the paper's default (its GLUE script used 500).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from splice.adapters.config import doc
from splice.errors import SpliceError
from splice.train.optim.blocks import find_layers
from splice.train.optim.registry import StrategyConfig, TrainStrategy, register_strategy


@dataclass
class GaloreConfig(StrategyConfig):
    """GaLore's options; names follow the paper's code (`rank`, `update_proj_gap`, `scale`)."""

    rank: int = doc("Rank r of the gradient projection of each weight matrix.", default=8)
    update_proj_gap: int = doc("Steps T between refreshes of the projection (an SVD of the current gradient).",
                               default=200)
    scale: float = doc("Scale α applied to the projected-back update.", default=4.0)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise SpliceError(f"galore rank: must be a positive integer, got {self.rank!r}")
        if not isinstance(self.update_proj_gap, int) or self.update_proj_gap < 1:
            raise SpliceError(f"galore update_proj_gap: must be a positive integer, got {self.update_proj_gap!r}")
        if not isinstance(self.scale, (int, float)) or not self.scale > 0:
            raise SpliceError(f"galore scale: must be positive, got {self.scale!r}")


def projector(grad: Tensor, rank: int) -> Tensor:
    """The projection for a (m, n) gradient: Q = V[:, :r] (n, r) when m ≥ n, else P = U[:, :r] (m, r)."""
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    basis = Vh[:rank].t() if grad.shape[0] >= grad.shape[1] else U[:, :rank]
    return basis.contiguous().to(grad.dtype)


def project(grad: Tensor, proj: Tensor) -> Tensor:
    return grad @ proj if grad.shape[0] >= grad.shape[1] else proj.t() @ grad  # (m, r) or (r, n)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose param groups with a `rank` key keep their moments in GaLore's projected space.

    Args:
        params: parameters or param groups; a group with `rank`, `update_proj_gap`, `scale` holds 2-D parameters
            to project, every other group is plain AdamW.
        lr, betas, eps, weight_decay: as torch.optim.AdamW.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            if group.get("rank") and any(p.dim() != 2 for p in group["params"]):
                raise SpliceError("GaLore projects 2-D weight matrices only; put other parameters in a group "
                                  "without 'rank'")

    def _allocate_state(self) -> None:
        # Every state tensor is allocated before any step temporary: allocated lazily between the SVD and
        # projection temporaries, the small moments pin freed heap regions and the peak RSS grows by more than
        # the state saves.
        for group in self.param_groups:
            rank = group.get("rank")
            for p in group["params"]:
                state = self.state[p]
                if p.grad is None or state:
                    continue
                shape = p.shape
                if rank:
                    m, n = shape
                    state["projector"] = p.new_zeros((n, rank) if m >= n else (m, rank))
                    shape = (m, rank) if m >= n else (rank, n)
                state["step"] = 0
                state["exp_avg"] = p.new_zeros(shape)
                state["exp_avg_sq"] = p.new_zeros(shape)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._allocate_state()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, rank = group["lr"], group.get("rank")
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad = p.grad
                if rank:
                    if state["step"] % group["update_proj_gap"] == 0:
                        state["projector"].copy_(projector(grad, rank))
                    grad = project(grad, state["projector"])
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2 ** t)).add_(group["eps"])  # one temporary
                step_size = lr / (1 - beta1 ** t)
                if rank:
                    low, proj = denom.reciprocal_().mul_(exp_avg), state["projector"]
                    # W += -η α · (projected back), by one GEMM into W: no (m, n) temporary
                    if p.shape[0] >= p.shape[1]:
                        p.addmm_(low, proj.t(), alpha=-step_size * group["scale"])
                    else:
                        p.addmm_(proj, low, alpha=-step_size * group["scale"])
                else:
                    p.addcdiv_(exp_avg, denom, value=-step_size)
        return loss


def state_floats(shape: Sequence[int], rank: int) -> int:
    """Optimizer-state numbers GaLore keeps for one (m, n) matrix: r · (2 · max(m, n) + min(m, n))."""
    m, n = shape
    return rank * (2 * max(m, n) + min(m, n))


@register_strategy("galore", config=GaloreConfig, reference="https://arxiv.org/abs/2403.03507")
class Galore(TrainStrategy):
    """Builds a GaLoreAdamW: the 2-D trained weights inside the repeated layers projected, the rest plain AdamW."""

    def _split(self, params: Sequence[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        inside: set[int] = set()
        for model in self.modules:
            found = find_layers(model)
            if found is not None:
                inside.update(id(p) for block in found[1] for p in block.parameters())
        if not inside:  # no layer list (a CNN, a toy model): every matrix is a candidate
            inside = {id(p) for p in params}
        r = self.config.rank
        projected = [p for p in params if id(p) in inside and p.dim() == 2 and min(p.shape) > r]
        chosen = {id(p) for p in projected}
        return projected, [p for p in params if id(p) not in chosen]

    def optimizer(self, params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
        projected, plain = self._split(params)
        if not projected:
            raise SpliceError(f"galore: no trained weight matrix inside the model's layers has both sides larger "
                              f"than rank={self.config.rank}; lower the rank")
        c = self.config
        groups = [{"params": projected, "rank": c.rank, "update_proj_gap": c.update_proj_gap, "scale": c.scale}]
        if plain:
            groups.insert(0, {"params": plain})
        self._counts = (sum(state_floats(p.shape, c.rank) for p in projected), sum(p.numel() for p in plain),
                        len(projected), sum(p.numel() for p in params))
        return GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay)

    def summary(self) -> dict[str, Any]:
        low, plain, count, total = getattr(self, "_counts", (0, 0, 0, 0))
        return {"projected_matrices": count, "trained_params": total, "grad_floats": total,
                "state_floats": low + 2 * plain}
