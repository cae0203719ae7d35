"""ReLoRA: high-rank training through low-rank updates (Lialin et al. 2023, https://arxiv.org/abs/2307.05695).

LoRA training (ΔW = s · B A) restarted every T steps: the current update is merged into the weight, the factors
are re-initialised, and the optimizer state of the factors is mostly reset, so the next cycle learns in a new
subspace and the sum of the cycles can reach rank k · r:

    every T steps:  W ← W + s · B A;   A ← Kaiming-uniform, B ← 0   (the model's output is unchanged)
                    Adam moments of A and B: the 99% smallest in magnitude are set to 0 (partial reset)
                    learning rate: ×1/(warmup+1) on the first step after a restart, back to the schedule linearly
                    over `warmup` steps (the paper's "jagged" schedule; the first cycle keeps the loop's own warm-up)

After training, the k merged cycles are taken out of the base weights again and the adapter becomes the exact sum
of all cycles, a LoRA of rank k · r (its factors concatenated: B = [B₁ … B_k], A = [A₁; …; A_k]; lora_alpha scaled
so that s is unchanged; past the matrix's full rank min(out, in), the exact SVD factorisation of that rank), so the
saved adapter is relative to the original base like any other and loads in PEFT.
ReLoRA's warm start (full-rank training before the first cycle) is for pre-training from scratch and is not
needed when fine-tuning a pre-trained model.

Defaults: the paper restarts every 5,000 steps of pre-training with a 100-step restart warm-up (its scripts:
`--relora 5000 --restart_warmup_steps 100`) and prunes 99% of the moments by magnitude. A fine-tuning run is a
few hundred steps, so here T = 50 and warm-up 10 steps (a run of ~170 steps restarts three times); `prune` 0.99 is
the paper's.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from splice.adapters.config import doc
from splice.errors import SpliceError
from splice.train.optim.registry import StrategyConfig, TrainStrategy, register_strategy


@dataclass
class ReloraConfig(StrategyConfig):
    """ReLoRA's options: the restart period, the warm-up after each restart, the share of moments reset."""

    interval: int = doc("T: steps between merge-and-restarts of the LoRA factors.", default=50)
    warmup: int = doc("Steps over which the learning rate climbs back after each restart.", default=10)
    prune: float = doc("Share of each factor's Adam moments set to zero at a restart (smallest magnitudes "
                       "first); 1 resets them completely.", default=0.99)

    def __post_init__(self) -> None:
        if not isinstance(self.interval, int) or self.interval < 1:
            raise SpliceError(f"relora interval: must be a positive integer, got {self.interval!r}")
        if not isinstance(self.warmup, int) or not 0 <= self.warmup < self.interval:
            raise SpliceError(f"relora warmup: must be an integer in [0, interval={self.interval}), "
                              f"got {self.warmup!r}")
        if not isinstance(self.prune, (int, float)) or not 0 <= self.prune <= 1:
            raise SpliceError(f"relora prune: must be in [0, 1], got {self.prune!r}")


@torch.no_grad()
def magnitude_prune_(t: Tensor, share: float) -> None:
    """Zero the `share` of `t`'s entries smallest in magnitude, in place."""
    keep = round(t.numel() * (1 - share))
    if keep <= 0:
        t.zero_()
    elif keep < t.numel():
        mags = t.abs()
        threshold = mags.flatten().kthvalue(t.numel() - keep).values
        t.mul_(mags > threshold)


def _at_most_full_rank(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """The same product B A with at most min(out, in) columns: past the matrix's full rank, an SVD (float64) gives
    an exact factorisation of the sum of cycles that a LoRA of that shape can hold."""
    full = min(B.shape[0], A.shape[1])
    if B.shape[1] <= full:
        return B, A
    U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    return (U[:, :full] * S[:full]).to(B.dtype), Vh[:full].to(A.dtype)


@dataclass
class _Cycle:
    """One LoRA adapter ReLoRA restarts: where it sits and the (B, A) factors of its merged cycles."""

    model: nn.Module
    name: str
    layer: nn.Module  # the AdapterLayer
    adapter: nn.Module  # the LoraAdapter
    merged: list[tuple[Tensor, Tensor]] = dataclasses.field(default_factory=list)


@register_strategy("relora", config=ReloraConfig, reference="https://arxiv.org/abs/2307.05695", pairs_with="lora")
class Relora(TrainStrategy):
    """Merges and restarts the trained LoRA adapters every `interval` steps; folds the cycles into one at the end."""

    def __init__(self, config: ReloraConfig, params: Sequence[nn.Parameter], modules: Sequence[nn.Module],
                 total_steps: int, seed: int = 0):
        from splice.adapters.inject import adapter_layers
        from splice.adapters.model import configs

        super().__init__(config, params, modules, total_steps, seed)
        trained = {id(p) for p in params}
        self.cycles: list[_Cycle] = []
        for model in modules:
            for _, layer in adapter_layers(model):
                for name, adapter in layer.adapters.items():
                    cfg = configs(model).get(name)
                    if cfg is not None and cfg.method == "lora" and id(adapter.lora_A) in trained:
                        self.cycles.append(_Cycle(model, name, layer, adapter))
        if not self.cycles:
            raise SpliceError("relora: needs a trained LoRA adapter to merge and restart (e.g. splice train "
                              "--method lora --strategy relora); found none among the trained parameters")
        self.restarts = 0

    def restart_steps(self) -> range:
        """Steps (counted as done) after which a restart happens: every `interval`, never at the last step."""
        return range(self.config.interval, self.total_steps, self.config.interval)

    def lr_factor(self, step: int) -> float:
        t, w = self.config.interval, self.config.warmup
        if step < t or step >= self.total_steps or not w:
            return 1.0
        since = step % t
        return (since + 1) / (w + 1) if since < w else 1.0

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if step in self.restart_steps():
            self.restart(optimizer)

    @torch.no_grad()
    def restart(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Merge every adapter's s·B·A into its base weight, re-initialise A and B, prune their moments."""
        for c in self.cycles:
            adapter, base = c.adapter, c.layer.base
            B, A = (t.detach().clone() for t in adapter.low_rank())
            adapter.delta(base)["weight"].apply_to(base.weight.data)
            c.merged.append((B, A))
            if adapter.pissa:  # the start B₀A₀ is part of what was merged; later cycles start from zero
                adapter.pissa = False
                del adapter.pissa_A0, adapter.pissa_B0
            adapter.reset(base, "kaiming")
            for p in (adapter.lora_A, adapter.lora_B):
                for key in ("exp_avg", "exp_avg_sq"):
                    moment = (optimizer.state.get(p) or {}).get(key) if optimizer is not None else None
                    if moment is not None:
                        magnitude_prune_(moment, self.config.prune)
        self.restarts += 1

    @torch.no_grad()
    def close(self) -> None:
        """Take the merged cycles out of the base weights and make each adapter their exact sum (rank k·r)."""
        from splice.adapters.lora import lora_update
        from splice.adapters.model import configs

        folded: dict[tuple[int, str], tuple[nn.Module, int]] = {}
        for c in self.cycles:
            if not c.merged:
                continue
            adapter, base = c.adapter, c.layer.base
            for B, A in c.merged:
                lora_update(B, A, adapter.scale, adapter.kind, base.weight.shape).apply_to(base.weight.data,
                                                                                         scale=-1.0)
            B_now, A_now = adapter.low_rank()
            B = torch.cat([*(b for b, _ in c.merged), B_now.detach()], 1)
            A = torch.cat([*(a for _, a in c.merged), A_now.detach()], 0)
            B, A = _at_most_full_rank(B, A)
            rank = A.shape[0]
            adapter.lora_A = nn.Parameter(A.reshape(rank, *adapter.lora_A.shape[1:]).contiguous(),
                                          requires_grad=adapter.lora_A.requires_grad)
            adapter.lora_B = nn.Parameter(B.reshape(B.shape[0], rank, *adapter.lora_B.shape[2:]).contiguous(),
                                          requires_grad=adapter.lora_B.requires_grad)
            cfg = configs(c.model)[c.name]
            # Same s = lora_alpha / r (or / √r) at the new rank; a module whose rank differs from the config's is
            # saved with PEFT's rank_pattern / alpha_pattern (see splice.adapters.inits.saved_patterns).
            adapter.r = rank
            adapter.lora_alpha = adapter.scale * (math.sqrt(rank) if cfg.use_rslora else rank)
            c.merged = []
            key = (id(c.model), c.name)
            folded[key] = (c.model, max(rank, folded.get(key, (None, 0))[1]))
        for (_, name), (model, rank) in folded.items():  # the config: the largest rank, alpha keeping s
            cfg = configs(model)[name]
            alpha = cfg.scaling * (math.sqrt(rank) if cfg.use_rslora else rank)
            configs(model)[name] = dataclasses.replace(cfg, r=rank, lora_alpha=alpha)

    def summary(self) -> dict[str, Any]:
        trained = sum(p.numel() for p in self.params)
        return {"restarts": self.restarts, "trained_params": trained, "grad_floats": trained,
                "state_floats": 2 * trained}
