"""AdaLoRA: adaptive budget allocation for low-rank adaptation (Zhang et al. 2023, https://arxiv.org/abs/2303.10512).

    ΔW = s/ρ · P Λ Q          P = B: out×r, Λ = diag(E): r×r (starts at 0), Q = A: r×in, ρ = init_r, s = lora_alpha

An SVD-shaped LoRA whose rank is allocated during training. After every step (`RankAllocator.after_step`) each
triplet (P_i, λ_i, Q_i) gets an importance score from a smoothed sensitivity |w · ∂L/∂w| times its uncertainty
(paper Eq. 8–11), and the λ of the least important triplets across *all* modules is set to 0 so that the total
rank follows the cubic budget schedule (Eq. 12):

    b(t) = init_r·n                                       t ≤ tinit
    b(t) = target_r·n + (init_r − target_r)·n·(1 − (t − tinit)/(T − tfinal − tinit))³   (masked every deltaT steps)
    b(t) = target_r·n                                     t > T − tfinal (the final mask stays fixed)

A regulariser orth_reg_weight · mean ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F keeps P and Q near orthogonal (`RankAllocator.loss`).
The allocation is kept in `rank_pattern` (module → which triplets survive); saved folders hold only the surviving
triplets, as PEFT's do. `delta()` is LowRank over the surviving triplets. Wraps nn.Linear and HF Conv1D.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.importance import Sensitivity, check_importance_fields, orthogonality
from splice.adapters.lora import lora_update, module_dims
from splice.adapters.registry import register
from splice.adapters.targets import ADALORA_TARGETS
from splice.delta.forms import Delta
from splice.errors import SpliceError

KINDS = ("linear", "conv1d")


@dataclass
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA hyper-parameters; field names and meanings follow PEFT's `AdaLoraConfig`."""

    init_r: int = doc("Rank every module starts with.", default=12)
    target_r: int = doc("Average rank per module at the end of the schedule.", default=8)
    lora_alpha: float = doc("Scaling numerator s (the update is s / init_r · PΛQ).", default=8)
    lora_dropout: float = doc("Dropout on the input of the low-rank branch (training only).", default=0.0)
    tinit: int = doc("Steps before any rank is pruned.", default=0)
    tfinal: int = doc("Final steps trained with the final allocation fixed.", default=0)
    deltaT: int = doc("Steps between two allocations during the schedule.", default=1)
    beta1: float = doc("Smoothing of the sensitivity (EMA coefficient).", default=0.85)
    beta2: float = doc("Smoothing of the uncertainty (EMA coefficient).", default=0.85)
    orth_reg_weight: float = doc("Weight of the orthogonality regulariser on P and Q.", default=0.5)
    total_step: int | None = doc("Training steps of the schedule (None: those of the run, set by `splice train`).",
                                 default=None)
    rank_pattern: dict[str, list[bool]] | None = doc(
        "The allocation: '<module>.lora_E' → which of the init_r triplets survive (filled in by training).",
        default=None)

    peft_type: ClassVar[str | None] = "ADALORA"
    target_table: ClassVar[dict[str, list[str]]] = ADALORA_TARGETS

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("init_r", "target_r", "deltaT"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpliceError(f"{name}: must be a positive integer, got {value!r}")
        if self.target_r > self.init_r:
            raise SpliceError(f"target_r: {self.target_r} is larger than init_r {self.init_r}")
        check_importance_fields(self)
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise SpliceError(f"tinit: {self.tinit} leaves no steps to allocate ranks in (total_step "
                              f"{self.total_step}, tfinal {self.tfinal})")

    @property
    def scaling(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha > 0 else float(self.init_r)

    def for_module(self, module: str, tensors: dict[str, Any], peft_cfg: dict[str, Any]) -> "AdaLoraConfig":
        config = copy.copy(self)
        config.module_rank = tensors["lora_A"].shape[0]  # not a field: the surviving triplets of this module
        return config

    @classmethod
    def fields_from_peft(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        total = cfg.get("total_step")
        return {**super().fields_from_peft(cfg), "init_r": int(cfg.get("init_r", 12)),
                "target_r": int(cfg.get("target_r", 8)), "lora_alpha": cfg.get("lora_alpha", 8),
                "lora_dropout": float(cfg.get("lora_dropout", 0.0)), "tinit": int(cfg.get("tinit", 0)),
                "tfinal": int(cfg.get("tfinal", 0)), "deltaT": int(cfg.get("deltaT", 1)),
                "beta1": float(cfg.get("beta1", 0.85)), "beta2": float(cfg.get("beta2", 0.85)),
                "orth_reg_weight": float(cfg.get("orth_reg_weight", 0.5)),
                "total_step": None if total is None else int(total), "rank_pattern": cfg.get("rank_pattern")}

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        return {**super().to_peft(base=base, kinds=kinds, adapters=adapters), "init_r": self.init_r,
                "target_r": self.target_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "tinit": self.tinit, "tfinal": self.tfinal, "deltaT": self.deltaT, "beta1": self.beta1,
                "beta2": self.beta2, "orth_reg_weight": self.orth_reg_weight,
                # PEFT refuses a config without total_step, even to load one for inference
                # and one whose schedule (tinit + tfinal) does not fit in it: never fewer steps than that.
                "total_step": max(self.total_step or 0, self.tinit + self.tfinal + 1),
                "rank_pattern": self.rank_pattern,
                "fan_in_fan_out": "conv1d" in kinds, "bias": "none", "init_lora_weights": True}

    def training_hook(self, model: nn.Module, adapter_name: str, total_steps: int) -> "RankAllocator":
        """What the training loop runs for this method: the regulariser and the rank allocation after each step."""
        if self.total_step is None or "total_step" in self._from_run:
            # Recorded on the config (a saved folder needs it, PEFT refuses one without), and taken afresh from the
            # next run that reuses this config object rather than kept from this one.
            self.total_step, self._from_run = total_steps, set(self._from_run) | {"total_step"}
            self.__post_init__()  # tinit/tfinal against the steps now known
        return RankAllocator(model, adapter_name, self)


@register("adalora", config=AdaLoraConfig, reference="https://arxiv.org/abs/2303.10512")
class AdaLoraAdapter(nn.Module):
    """One AdaLoRA adapter (P, Λ, Q) on one module."""

    peft_keys: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_E")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: AdaLoraConfig) -> dict[str, tuple[int, ...]]:
        in_f, out_f = module_dims(base, kind)
        r = getattr(config, "module_rank", config.init_r)
        return {"lora_A": (r, in_f), "lora_B": (out_f, r), "lora_E": (r, 1)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        return None if {"lora_A", "lora_B", "lora_E"} <= tensors.keys() else "expected lora_A, lora_B and lora_E"

    def __init__(self, base: nn.Module, kind: str, config: AdaLoraConfig):
        super().__init__()
        if kind not in KINDS:
            raise SpliceError(f"adalora cannot wrap {type(base).__name__}; it wraps nn.Linear and HF Conv1D")
        in_f, out_f = module_dims(base, kind)
        if config.init_r > min(in_f, out_f):
            raise SpliceError(f"init_r: rank {config.init_r} is larger than the layer ({in_f} → {out_f})")
        self.kind = kind
        self.dropout = float(config.lora_dropout)
        # PEFT divides by the initial rank even after pruning (its `ranknum`), so the scale never changes.
        self.scale = config.scaling / (config.init_r + 1e-5)
        shapes = self.peft_shapes(base, kind, config)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.randn(shapes["lora_A"], device=dev, dtype=dt) * 0.02)
        self.lora_B = nn.Parameter(torch.randn(shapes["lora_B"], device=dev, dtype=dt) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(shapes["lora_E"], device=dev, dtype=dt))
        self.register_buffer("rank_mask", torch.ones(shapes["lora_E"][0], dtype=torch.bool, device=dev))

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        xd = F.dropout(x, self.dropout, self.training) if self.dropout else x
        h = xd.to(self.lora_A.dtype) @ (self.lora_A * self.lora_E).t()
        return (h @ self.lora_B.t() * self.scale).to(base_out.dtype)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        keep = self.lora_E.detach().view(-1) != 0  # a pruned triplet (λ = 0) adds nothing: leave it out
        B, A = self.lora_B.detach()[:, keep], (self.lora_A * self.lora_E).detach()[keep]
        return {"weight": lora_update(B, A, self.scale, self.kind, base.weight.shape)}

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        keep = self.rank_mask  # only the surviving triplets, as PEFT saves them
        return {"lora_A": self.lora_A.detach()[keep], "lora_B": self.lora_B.detach()[:, keep],
                "lora_E": self.lora_E.detach()[keep]}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        for key in self.peft_keys:
            getattr(self, key).copy_(state[key])


class RankAllocator:
    """AdaLoRA's budget schedule over one adapter of a model (PEFT's `RankAllocator`, step for step)."""

    def __init__(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig):
        from splice.adapters.inject import adapter_layers

        self.config = config
        named = {path: layer.adapters[adapter_name] for path, layer in adapter_layers(model)
                 if adapter_name in layer.adapters}
        self.adapters = {path: a for path, a in named.items() if isinstance(a, AdaLoraAdapter)}
        if not self.adapters:
            raise SpliceError(f"adapter {adapter_name!r} has no AdaLoRA module")
        self.init_budget = sum(a.lora_E.shape[0] for a in self.adapters.values())
        self.target_budget = config.target_r * len(self.adapters)
        self.importance = Sensitivity(config.beta1, config.beta2)

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at `step`, whether to re-mask now): the cubic schedule."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * progress ** 3 + self.target_budget)
        return budget, step % c.deltaT == 0

    def loss(self) -> Tensor:
        """orth_reg_weight · mean over P and Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F."""
        return self.config.orth_reg_weight * orthogonality((a.lora_A, a.lora_B) for a in self.adapters.values())

    def _update_importance(self) -> None:
        self.importance.update(p for a in self.adapters.values() for p in (a.lora_A, a.lora_B, a.lora_E))

    @torch.no_grad()
    def _mask_to(self, budget: int) -> None:
        # A triplet's importance: its λ's score + the mean score of its row of Q and of its column of P.
        scores = {path: self.importance.triplet_scores(a.lora_A, a.lora_E, a.lora_B)
                  for path, a in self.adapters.items()}
        if budget >= self.init_budget:  # nothing to prune (target_r = init_r, or a reloaded, pruned adapter)
            for a in self.adapters.values():
                a.rank_mask.fill_(True)
            self._apply_mask()
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.init_budget - budget)[0].item()
        for path, a in self.adapters.items():
            a.rank_mask.copy_(scores[path] > threshold)
        self._apply_mask()

    @torch.no_grad()
    def _apply_mask(self) -> None:
        pattern = {}
        for path, a in self.adapters.items():
            a.lora_E.masked_fill_(~a.rank_mask.view(-1, 1), 0.0)
            pattern[f"{path}.lora_E"] = a.rank_mask.tolist()
        self.config.rank_pattern = pattern  # what the folder records (and PEFT reads)

    def after_step(self, step: int) -> None:
        """Run after the optimizer step, before the gradients are cleared (PEFT's `update_and_allocate`)."""
        c = self.config
        final = c.total_step - c.tfinal
        if step < final:
            self._update_importance()
            budget, now = self.budget(step)
            if now:
                self._mask_to(budget)
        elif step == final:
            self._update_importance()
            self._mask_to(self.budget(step)[0])
            self.importance.reset()
        else:
            self._apply_mask()  # the final allocation stays: λs the optimizer moved are zeroed again
