"""What the LyCORIS family (LoHa, LoKr; https://arxiv.org/abs/2309.14859) shares: its config fields, their PEFT
translation, and the two training-time dropouts.

- rank dropout drops whole output rows of the update ΔW (each with probability p) on every training step;
- module dropout skips the adapter altogether on a training step with probability p.

Both are off in eval, so they never change a saved or merged adapter.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc, pattern_value
from splice.errors import SpliceError

KINDS = ("linear", "conv2d")


@dataclass
class LycorisConfig(AdapterConfig):
    """Fields LoHa and LoKr share; names and meanings follow PEFT's `LycorisConfig`."""

    r: int = doc("Rank of each low-rank factor.", default=8)
    alpha: float = doc("Scaling numerator: the update is scaled by alpha / r.", default=8)
    rank_dropout: float = doc("Training only: probability of dropping each output row of the update.", default=0.0)
    module_dropout: float = doc("Training only: probability of skipping the adapter on a step.", default=0.0)
    use_effective_conv2d: bool = doc(
        "For Conv2d with a kernel larger than 1×1: factor the kernel as a CP decomposition (FedPara's Proposition 3) "
        "instead of flattening it.", default=False)
    rank_pattern: dict[str, int] = doc(
        "Per-module ranks overriding r: module name (suffix or regex, PEFT's syntax) → rank.", default_factory=dict)
    alpha_pattern: dict[str, float] = doc("Per-module alphas overriding alpha, like rank_pattern.",
                                          default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise SpliceError(f"{name}: must be a mapping of module name → value, got {getattr(self, name)!r}")
        for name, value in (("r", self.r), *(("rank_pattern", v) for v in self.rank_pattern.values())):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpliceError(f"{name}: ranks must be positive integers, got {value!r}")
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise SpliceError(f"{name}: must be in [0, 1), got {getattr(self, name)!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def fields_from_peft(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {**super().fields_from_peft(cfg), "r": int(cfg.get("r", 8)), "alpha": cfg.get("alpha", 8),
                "rank_dropout": float(cfg.get("rank_dropout", 0.0)),
                "module_dropout": float(cfg.get("module_dropout", 0.0)),
                "use_effective_conv2d": bool(cfg.get("use_effective_conv2d", False)),
                "rank_pattern": dict(cfg.get("rank_pattern") or {}),
                "alpha_pattern": dict(cfg.get("alpha_pattern") or {})}

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        return {**super().to_peft(base=base, kinds=kinds, adapters=adapters), "r": self.r, "alpha": self.alpha,
                "rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout,
                "use_effective_conv2d": self.use_effective_conv2d, "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern)}

    def for_target(self, name: str) -> "LycorisConfig":
        """This module's rank and alpha (rank_pattern / alpha_pattern)."""
        return dataclasses.replace(self, r=pattern_value(name, self.rank_pattern, self.r),
                                   alpha=pattern_value(name, self.alpha_pattern, self.alpha))


def check_kind(method: str, base: nn.Module, kind: str) -> None:
    """LyCORIS methods wrap nn.Linear and ungrouped nn.Conv2d, as in PEFT."""
    if kind not in KINDS:
        raise SpliceError(f"{method} cannot wrap {type(base).__name__}; it wraps nn.Linear and nn.Conv2d")
    if kind == "conv2d" and base.groups != 1:
        raise SpliceError(f"{method} cannot wrap a grouped Conv2d (groups={base.groups})")


def effective_conv(config: LycorisConfig, base: nn.Module, kind: str) -> bool:
    """Whether the kernel gets its own CP factor (PEFT ignores the option for 1×1 kernels)."""
    return kind == "conv2d" and config.use_effective_conv2d and tuple(base.kernel_size) != (1, 1)


def skip_module(adapter: nn.Module) -> bool:
    """Module dropout: on a training step, skip the adapter with probability `module_dropout`."""
    p = adapter.module_dropout
    return adapter.training and p > 0 and bool(torch.rand(1) < p)


def drop_rows(weight: Tensor, p: float, rescale: bool) -> Tensor:
    """Rank dropout: zero each output row of the update with probability p (rescaled by the kept fraction)."""
    keep = (torch.rand(weight.shape[0]) > p).to(weight.dtype)
    if rescale:
        keep = keep / keep.mean()  # PEFT's rescaling: divide by the fraction kept (nan if none is; as in PEFT)
    return weight * keep.to(weight.device).view(-1, *[1] * (weight.dim() - 1))


class PeftKeysState:
    """PEFT's tensors of a LyCORIS adapter are its own attributes, named as `peft_keys` (those it has: a factor
    may be one tensor or a low-rank pair)."""

    peft_keys: tuple[str, ...]

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {k: getattr(self, k).detach() for k in self.peft_keys if hasattr(self, k)}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        for key, value in state.items():
            getattr(self, key).copy_(value)


def apply_update(x: Tensor, weight: Tensor, base: nn.Module, kind: str) -> Tensor:
    """The layer's map with weight `weight` and no bias: what an additive update ΔW contributes to the output."""
    x = x.to(weight.dtype)
    if kind == "conv2d":
        return nn.functional.conv2d(x, weight, None, base.stride, base.padding, base.dilation, base.groups)
    return nn.functional.linear(x, weight)
