"""IncreLoRA: low-rank adaptation whose rank grows during training (Zhang et al. 2023,
https://arxiv.org/abs/2308.12043).

    ΔW = s · P Λ Q = s · Σ_{i < k} λ_i P_{·i} Q_{i·}      P = B: out×k, Λ = diag(E), Q = A: k×in, s = lora_alpha / r

The SVD-shaped update of AdaLoRA, grown instead of pruned. Every module starts at rank `init_r` (the paper: 1) and,
after a warm-up of `tinit` steps, every `deltaT` steps the `top_h` modules whose triplets score highest get
`rank_step` more, until the model holds the budget r · n (n wrapped modules: r per module on average, as a LoRA of
rank r); the budget is never exceeded. Scores are AdaLoRA's smoothed sensitivity × uncertainty
(`splice.adapters.importance`, shared code): a module scores the mean over its active triplets of AdaLoRA's triplet
score. The same orthogonality regulariser keeps P and Q near orthonormal (`orth_reg_weight`).

New components do not change the function. With `advance_learning` (the paper's default) each module keeps
`rank_step` reserve components past its rank that train ahead of time with a fixed λ = 1e-5 (the paper's value)
and B starting at 0; a grown component keeps that λ as the start of its trained λ, so the output does not move, and
the next reserve starts at B = 0. Without it a new component starts at λ = 0. The reserves are dropped once the
budget is spent (a change of order 1e-5 · s · ‖B A‖, as in the paper), after which the allocation stays fixed.

The optimizer's parameters are fixed when training starts, so every module holds `max_r` components from the
start: the forward uses the first k = rank + reserve of them and the rest are not in the graph (zero gradient; with
weight decay 0 AdamW leaves them exactly as they are, with weight decay they only shrink). `delta()` is LowRank over
the k components in use, so inactive ones add exactly nothing; `rank_pattern` records each module's rank.

Trainable parameters per module: max_r · (in + out + 1) allocated (the count `trainable_parameters` and the
optimizer see; max_r defaults to 2r, capped by the layer), of which rank · (in + out + 1) are in use: r · (in + out
+ 1) per module on average once the budget is spent, the paper's count.

Choices where the paper leaves room, and where splice differs from the authors' code (github.com/FeiyuZhang98/
IncreLoRA), stated:
- Defaults are the authors' GLUE scripts': init_r 1, rank_step r/2 (their table {2: 1, 4: 2, 6: 3, 8: 4}),
  beta1 = beta2 = 0.85, orth_reg_weight 0.1, advance learning on, tinit = deltaT, lora_alpha 16 (SST-2; 32 in
  others). Their scripts give tinit and deltaT in steps (100–1000) for runs of thousands of steps and select
  top_h = 3–10 of 72 modules; here top_h = ⌈n / 8⌉ and deltaT is set from the run's length so that growth ends by
  40% of training (it ends 35–40% into their MRPC, RTE and CoLA runs).
- The scale is the constant lora_alpha / r. The authors divide by each module's current rank, so a module's update
  shrinks every time it grows; a constant scale keeps the function continuous.
- The authors' reserve components start at P, Q ~ N(0, 0.02²); here a reserve's B starts at 0, so that the
  adapted model equals the base exactly at the start.
- The authors' code scores a module from its product ΔW (Σ|ΔW ⊙ ∂L/∂ΔW| / √(out·in), smoothed the same way), which
  needs each module's out × in gradient every step; splice scores the factors P, Λ, Q exactly as AdaLoRA does.
- `max_r` is splice's: the authors append new tensors as modules grow, which a fixed optimizer cannot see. Their
  new tensors join the optimizer with fresh Adam state; here the run's optimizer (`make_optimizer`: AdamW with a
  per-element age, `splice.train.optim.element_age`) restarts the grown components' state at age 0, the same
  thing. Under an optimizer with one step count (a strategy's, or yours via `bind_optimizer` without
  `make_optimizer`) they start with zero moments at the run's step, whose bias correction makes their first steps
  up to several times the rate.
- Not done: the paper's "restart warm-up" of the learning rate after each growth (the one training loop owns the
  schedule; a hook does not).

PEFT has no IncreLoRA: `save_adapter` writes PEFT's folder shape with `peft_type: null`, `splice_method:
"increlora"`, and each module's components in use as `increlora_A` (k, in), `increlora_E` (k, 1) and `increlora_B`
(out, k). Wraps nn.Linear and HF Conv1D.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.importance import Sensitivity, check_importance_fields, orthogonality
from splice.adapters.lora import linear_weight, lora_update, module_dims
from splice.adapters.ops import lora_linear
from splice.adapters.registry import register
from splice.delta.forms import Delta
from splice.errors import SpliceError
from splice.train.optim.element_age import ElementAgeAdamW

KINDS = ("linear", "conv1d")
KEY_A, KEY_E, KEY_B = "increlora_A", "increlora_E", "increlora_B"
RESERVE_LAMBDA = 1e-5  # λ of a reserve component (the authors' value), kept as the start of its trained λ
GROWTH_END = 0.4  # with tinit/deltaT unset, growth ends this far into training


def _positive(value: Any, allow_zero: bool = False) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= (0 if allow_zero else 1)


@dataclass
class IncreLoraConfig(AdapterConfig):
    """IncreLoRA hyper-parameters: the budget (r per module on average) and its growth schedule."""

    r: int = doc("Budget: the average rank per module once grown (r · n components over n modules).", default=8)
    init_r: int = doc("Rank every module starts with.", default=1)
    max_r: int | None = doc("Most components one module can grow to (allocated up front, so they count as "
                            "trainable); None: 2r, capped by the layer.", default=None)
    rank_step: int | None = doc("Components a selected module gains per growth; None: r / 2 (at least 1).",
                                default=None)
    top_h: int | None = doc("Modules selected per growth; None: one in eight (rounded up).", default=None)
    lora_alpha: float = doc("Scaling numerator: the update is scaled by lora_alpha / r.", default=16)
    lora_dropout: float = doc("Dropout on the input of the low-rank branch (training only).", default=0.0)
    tinit: int | None = doc("Steps before the first growth; None: deltaT.", default=None)
    deltaT: int | None = doc("Steps between two growths; None: set from the run's length so that growth ends 40% "
                             "into training.", default=None)
    beta1: float = doc("Smoothing of the sensitivity (EMA coefficient).", default=0.85)
    beta2: float = doc("Smoothing of the uncertainty (EMA coefficient).", default=0.85)
    orth_reg_weight: float = doc("Weight of the orthogonality regulariser on P and Q.", default=0.1)
    advance_learning: bool = doc("Train rank_step reserve components per module ahead of their growth (λ fixed at "
                                 "1e-5), as the paper does.", default=True)
    total_step: int | None = doc("Training steps (None: those of the run, set by `splice train`).", default=None)
    rank_pattern: dict[str, int] | None = doc("Each module's rank (filled in by training).", default=None)

    params_formula: ClassVar[str] = ("max_r·(in + out + 1) allocated (max_r = 2r by default), rank·(in + out + 1) "
                                     "in use: r·(in + out + 1) per module on average once grown")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "init_r"):
            if not _positive(getattr(self, name)):
                raise SpliceError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if self.init_r > self.r:
            raise SpliceError(f"r: the budget ({self.r} per module) is smaller than the initial rank init_r "
                              f"{self.init_r}")
        for name in ("max_r", "rank_step", "top_h", "deltaT", "total_step"):
            value = getattr(self, name)
            if value is not None and not _positive(value):
                raise SpliceError(f"{name}: must be a positive integer or null, got {value!r}")
        if self.tinit is not None and not _positive(self.tinit, allow_zero=True):
            raise SpliceError(f"tinit: must be a non-negative integer or null, got {self.tinit!r}")
        if self.max_r is not None and self.max_r < self.r:
            raise SpliceError(f"max_r: {self.max_r} is smaller than r {self.r}, so the budget could not be spent")
        check_importance_fields(self)
        if not isinstance(self.advance_learning, bool):
            raise SpliceError(f"advance_learning: must be true or false, got {self.advance_learning!r}")

    @property
    def scaling(self) -> float:
        return float(self.lora_alpha) / self.r

    @property
    def step_size(self) -> int:
        """Components a selected module gains per growth."""
        return self.rank_step or max(1, self.r // 2)

    def capacity(self, in_f: int, out_f: int) -> int:
        """Components allocated for a module of this size."""
        return self.max_r or min(2 * self.r, in_f, out_f)

    def for_module(self, module: str, tensors: dict[str, Any], peft_cfg: dict[str, Any]) -> "IncreLoraConfig":
        config = copy.copy(self)
        config.module_rank = tensors[KEY_A].shape[0]  # not a field: the components this module saved
        return config

    def training_hook(self, model: nn.Module, adapter_name: str, total_steps: int) -> "RankGrower":
        """What the training loop runs for this method: the regulariser, and the growth after each step."""
        if self.total_step is None or "total_step" in self._from_run:
            # Recorded for the saved folder; a later run reusing this config object takes its own (as AdaLoRA).
            self.total_step, self._from_run = total_steps, set(self._from_run) | {"total_step"}
        return RankGrower(model, adapter_name, self)


@register("increlora", config=IncreLoraConfig, reference="https://arxiv.org/abs/2308.12043")
class IncreLoraAdapter(nn.Module):
    """One IncreLoRA adapter on one module: max_r triplets (P, Λ, Q) allocated, the first `rank` of them active
    and the next `reserve` training ahead of their growth."""

    peft_keys: ClassVar[tuple[str, ...]] = (KEY_A, KEY_E, KEY_B)

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: IncreLoraConfig) -> dict[str, tuple[int, ...]]:
        in_f, out_f = module_dims(base, kind)
        k = getattr(config, "module_rank", None) or config.capacity(in_f, out_f)
        return {KEY_A: (k, in_f), KEY_E: (k, 1), KEY_B: (out_f, k)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        return None if {KEY_A, KEY_E, KEY_B} <= tensors.keys() else f"expected {KEY_A}, {KEY_E} and {KEY_B}"

    def __init__(self, base: nn.Module, kind: str, config: IncreLoraConfig):
        super().__init__()
        if kind not in KINDS:
            raise SpliceError(f"increlora cannot wrap {type(base).__name__}; it wraps nn.Linear and HF Conv1D")
        in_f, out_f = module_dims(base, kind)
        for name in ("init_r", "max_r"):
            value = getattr(config, name)
            if value is not None and value > min(in_f, out_f):
                raise SpliceError(f"{name}: rank {value} is larger than the layer ({in_f} → {out_f})")
        self.kind = kind
        self.dropout = float(config.lora_dropout)
        self.scale = config.scaling
        loaded = getattr(config, "module_rank", None)  # a saved module: every saved component is in use
        self.capacity = loaded or config.capacity(in_f, out_f)
        self.rank = loaded or config.init_r
        self.step_size = config.step_size
        self.advance = config.advance_learning and not loaded
        self.reserve = self._reserve_size()
        dev, dt = base.weight.device, base.weight.dtype
        # AdaLoRA's (and the authors') init: P, Q ~ N(0, 0.02²), λ = 0. A component that will first be a reserve
        # starts at B = 0 instead, so that its fixed λ adds nothing until it has trained.
        self.lora_A = nn.Parameter(torch.randn(self.capacity, in_f, device=dev, dtype=dt) * 0.02)
        self.lora_B = nn.Parameter(torch.randn(out_f, self.capacity, device=dev, dtype=dt) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(self.capacity, 1, device=dev, dtype=dt))
        if self.advance:
            with torch.no_grad():
                self.lora_B[:, self.rank:] = 0

    def _reserve_size(self) -> int:
        return min(self.step_size, self.capacity - self.rank) if self.advance else 0

    @property
    def in_use(self) -> int:
        """Components in the forward: the active ones, then the reserve."""
        return self.rank + self.reserve

    def get_extra_state(self) -> dict[str, int]:
        return {"rank": self.rank, "reserve": self.reserve}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.rank, self.reserve = int(state["rank"]), int(state["reserve"])

    def lam(self) -> Tensor:
        """(k, 1) λ of the components in use: the trained λ of the active ones, then the reserve's fixed 1e-5."""
        lam = self.lora_E[: self.rank]
        if self.reserve:
            lam = torch.cat([lam, lam.new_full((self.reserve, 1), RESERVE_LAMBDA)])
        return lam

    def factors(self) -> tuple[Tensor, Tensor]:
        """(B, ΛQ) of the components in use, (out, k) and (k, in): ΔW = s · B · ΛQ."""
        k = self.in_use
        return self.lora_B[:, :k], self.lora_A[:k] * self.lam()

    # -- forward -------------------------------------------------------------------------------------------------
    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        B, A = self.factors()
        p = self.dropout if self.training else 0.0
        return lora_linear(x, linear_weight(base, self.kind), base.bias, A, B, self.scale, p)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        B, A = self.factors()
        xd = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return ((xd.to(A.dtype) @ (A * self.scale).t()) @ B.t()).to(base_out.dtype)

    # -- growth --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def grow(self, n: int) -> tuple[slice, slice]:
        """Activate the next `n` components without changing the function: a reserve component's fixed λ becomes
        its trained λ's start, any other starts at λ = 0; a fresh reserve follows.

        Returns:
            the components whose λ starts training, and those whose P and Q enter the forward now (a new reserve,
            or new active ones without one): as the authors add these to the optimizer when they grow.
        """
        n = min(n, self.capacity - self.rank)
        was_reserve = min(n, self.reserve)
        used = self.in_use
        self.lora_E[self.rank:self.rank + was_reserve] = RESERVE_LAMBDA
        self.lora_E[self.rank + was_reserve:self.rank + n] = 0.0
        started = slice(self.rank, self.rank + n)
        self.rank += n
        self.reserve = self._reserve_size()
        return started, slice(used, self.in_use)

    def drop_reserve(self) -> None:
        self.reserve = 0

    # -- the delta and the folder --------------------------------------------------------------------------------
    def delta(self, base: nn.Module) -> dict[str, Delta]:
        B, A = (t.detach() for t in self.factors())
        return {"weight": lora_update(B, A, self.scale, self.kind, base.weight.shape)}

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        k = self.in_use
        return {KEY_A: self.lora_A[:k].detach(), KEY_E: self.lam().detach(), KEY_B: self.lora_B[:, :k].detach()}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        for key, p in ((KEY_A, self.lora_A), (KEY_E, self.lora_E), (KEY_B, self.lora_B)):
            p.copy_(state[key])


class RankGrower:
    """IncreLoRA's schedule over one adapter of a model (the training hook): importance scores after every step,
    growth of the top modules every deltaT steps after tinit, until the budget is spent."""

    def __init__(self, model: nn.Module, adapter_name: str, config: IncreLoraConfig):
        from splice.adapters.inject import adapter_layers

        self.config = config
        self.adapters = {path: layer.adapters[adapter_name] for path, layer in adapter_layers(model)
                         if adapter_name in layer.adapters and isinstance(layer.adapters[adapter_name],
                                                                          IncreLoraAdapter)}
        if not self.adapters:
            raise SpliceError(f"adapter {adapter_name!r} has no IncreLoRA module")
        n = len(self.adapters)
        self.budget = config.r * n
        self.top_h = config.top_h or math.ceil(n / 8)
        derived = set(config._from_run)
        if config.deltaT is None or "deltaT" in derived:
            # growth ends GROWTH_END into the run: tinit (= deltaT) + one deltaT per round
            per_round = self.top_h * config.step_size
            rounds = max(1, math.ceil((self.budget - self.total) / per_round))
            config.deltaT = max(1, int(GROWTH_END * (config.total_step or 1)) // (rounds + 1))
            derived.add("deltaT")
        if config.tinit is None or "tinit" in derived:
            config.tinit = config.deltaT
            derived.add("tinit")
        config._from_run = derived  # recorded values a later run re-derives instead of keeping
        self.importance = Sensitivity(config.beta1, config.beta2)
        self.optimizer: torch.optim.Optimizer | None = None
        self.done = self.total >= self.budget
        self._record()

    def make_optimizer(self, params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> ElementAgeAdamW:
        """AdamW over `params` with a per-element age for the IncreLoRA factors (the training loop calls this)."""
        factors = [p for a in self.adapters.values() for p in (a.lora_A, a.lora_E, a.lora_B)]
        return ElementAgeAdamW.aging(params, factors, lr, weight_decay)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer that steps the factors: growth restarts the grown components' state in it."""
        self.optimizer = optimizer

    @property
    def total(self) -> int:
        """Active components over all modules (reserves not counted)."""
        return sum(a.rank for a in self.adapters.values())

    def loss(self) -> Tensor:
        """orth_reg_weight · mean over the modules of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F (components in use)."""
        return self.config.orth_reg_weight * orthogonality(
            (a.lora_A[:a.in_use], a.lora_B[:, :a.in_use]) for a in self.adapters.values())

    def after_step(self, step: int) -> None:
        """Run after the optimizer step, before the gradients are cleared."""
        if self.done:
            return
        self.importance.update(p for a in self.adapters.values() for p in (a.lora_A, a.lora_E, a.lora_B))
        if step > self.config.tinit and step % self.config.deltaT == 0:
            self._grow()

    @torch.no_grad()
    def _grow(self) -> None:
        scores = {path: self.importance.triplet_scores(a.lora_A, a.lora_E, a.lora_B)[:a.rank].mean().item()
                  for path, a in self.adapters.items() if a.rank < a.capacity}
        left = self.budget - self.total
        for path in sorted(scores, key=scores.get, reverse=True)[:self.top_h]:
            if left <= 0:
                break
            adapter = self.adapters[path]
            n = min(self.config.step_size, adapter.capacity - adapter.rank, left)
            trained_lambda, entered = adapter.grow(n)
            left -= n
            # What just started training starts its Adam afresh, where the optimizer keeps ages per element (any
            # other optimizer, or one built without the factors' element_age group, keeps its state as it is).
            if isinstance(self.optimizer, ElementAgeAdamW) and self.optimizer.ages(adapter.lora_E):
                self.optimizer.restart(adapter.lora_E, trained_lambda, 0)
                self.optimizer.restart(adapter.lora_A, entered, 0)
                self.optimizer.restart(adapter.lora_B, (slice(None), entered), 0)
        if left <= 0 or all(a.rank >= a.capacity for a in self.adapters.values()):
            self.done = True  # the budget is spent (or no module can grow): drop the reserves, keep the ranks
            for a in self.adapters.values():
                a.drop_reserve()
            self.importance.reset()
        self._record()

    def _record(self) -> None:
        self.config.rank_pattern = {path: a.rank for path, a in self.adapters.items()}
