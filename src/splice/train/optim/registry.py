"""Training strategies registered by name: what a memory-efficient method changes in the one training loop.

A strategy is a config dataclass plus a class that the loop (`splice.train.loop.train_loop`) asks, at fixed points,
for what differs from plain AdamW: the optimizer (GaLore), which parameters train before each step (LISA, HFT),
what happens after a step (ReLoRA's merge and restart), a factor on the learning-rate schedule (ReLoRA's jagged
warm-up), and a last call when training ends. Every hook is optional; the loop itself stays one loop.

Registering both under one name is what lets `splice train --strategy NAME`, `TrainConfig(strategy=NAME)` and the
benchmarks find a strategy without a list to keep in sync.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from splice.registry import Registry, import_modules


@dataclass
class StrategyConfig:
    """Base of every strategy's config; subclasses add their fields (with `doc()` help) and validate them."""

    name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrainStrategy:
    """What a strategy adds to the loop. The loop calls, in order: `optimizer` once, then for each step
    `before_step(step)` (0-based, before the forward), the step, `after_step(step + 1)`; `lr_factor(step)` scales the
    loop's schedule; `close()` runs when the loop ends (also on an error) and leaves the model consistent.

    Args:
        config: the strategy's config.
        params: the parameters the caller asked to train (all with requires_grad on).
        modules: the models being trained (the strategy finds layers and adapters in them).
        total_steps: how many steps the loop will run.
        seed: seed of the strategy's own random choices (LISA's and HFT's selections).
    """

    def __init__(self, config: Any, params: Sequence[nn.Parameter], modules: Sequence[nn.Module],
                 total_steps: int, seed: int = 0):
        self.config = config
        self.params = list(params)
        self.modules = list(modules)
        self.total_steps = total_steps
        self.seed = seed

    def optimizer(self, params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer | None:
        """The optimizer to use, or None for the loop's AdamW."""
        return None

    def lr_factor(self, step: int) -> float:
        """A factor on the loop's learning rate at `step` (0-based)."""
        return 1.0

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Before the forward of step `step` (0-based)."""

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """After the optimizer step; `step` steps are done (1-based)."""

    def close(self) -> None:
        """Training ended: undo temporary changes (frozen parameters, merged updates)."""

    def summary(self) -> dict[str, Any]:
        """What the run did, for reports: `trained_params` (per step, at most), `grad_floats` and `state_floats`
        (gradient and optimizer-state numbers held at the step's peak), where the strategy can tell."""
        return {}


@dataclass(frozen=True)
class Strategy:
    """One registered strategy: name, config class, mechanism class, paper link, and what it trains on top of:
    "full" (every weight of the model) or "lora" (a LoRA adapter), which is how the benchmarks pair it."""

    name: str
    config: type
    cls: type
    reference: str = ""
    pairs_with: str = "full"


# One file per strategy in splice.train.optim: importing it registers the strategy.
STRATEGIES: Registry[Strategy] = Registry(
    "training strategy", lambda: import_modules("splice.train.optim", skip=("registry", "blocks")))


def register_strategy(name: str, *, config: type, reference: str = "",
                      pairs_with: str = "full") -> Callable[[type], type]:
    """Class decorator registering a `TrainStrategy` subclass as strategy `name` with its config class."""
    if pairs_with not in ("full", "lora"):
        raise ValueError(f"pairs_with must be 'full' or 'lora', got {pairs_with!r}")

    def wrap(cls: type) -> type:
        STRATEGIES.add(name, Strategy(name, config, cls, reference, pairs_with))
        config.name = name  # type: ignore[attr-defined]
        return cls

    return wrap


def get_strategy(name: str) -> Strategy:
    """Look a strategy up by name, with a did-you-mean suggestion on a typo."""
    return STRATEGIES.lookup(name)


def strategy_names() -> list[str]:
    return STRATEGIES.names()


def make_strategy_config(name: str, **options: Any) -> StrategyConfig:
    """Build strategy `name`'s config from plain options (YAML, CLI), rejecting unknown keys."""
    from splice.adapters.config import config_from_dict

    return config_from_dict(get_strategy(name).config, options, f"strategy {name!r}")


def build_strategy(config: StrategyConfig, params: Sequence[nn.Parameter], modules: Sequence[nn.Module],
                   total_steps: int, seed: int = 0) -> TrainStrategy:
    """The mechanism of `config`'s strategy for one run of the loop."""
    return get_strategy(config.name).cls(config, params, modules, total_steps, seed)
