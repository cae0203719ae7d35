"""LISA: layerwise importance sampled AdamW (Pan et al. 2024, https://arxiv.org/abs/2403.17919).

Full-parameter AdamW in which, every K steps, all N_L layers are frozen except γ sampled uniformly at random; the
embeddings and the head (everything outside the layer list) always train (the paper's Algorithm 1):

    for each period i = 0 … T/K − 1:
        freeze all layers except the embedding and the head
        sample γ of the N_L layers uniformly, unfreeze them
        run AdamW for K steps

Frozen layers have requires_grad off, so they get no gradient; their optimizer state is dropped when they are
frozen (a layer sampled again starts with fresh moments), so gradients and optimizer state cover only
(outside + γ layers) at any step: 3 · (N_outside + γ · N_layer) numbers instead of 3 · N_total (AdamW: gradient +
two moments). The layer list is found generically (see `blocks.find_layers`); with an adapter, LISA samples the
layers whose adapter parameters train.

Defaults: γ = 2 is the paper's main setting ("E+H+2L": embedding, head and 2 layers, in its memory tables and
instruction-tuning runs); K = 20 steps is the period in the authors' LMFlow script (`lisa_interval_steps 20`).
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splice.adapters.config import doc
from splice.errors import SpliceError
from splice.train.optim.blocks import drop_state, layout
from splice.train.optim.registry import StrategyConfig, TrainStrategy, register_strategy


@dataclass
class LisaConfig(StrategyConfig):
    """LISA's options: how many layers train at a time, and how often they are resampled."""

    layers: int = doc("γ: layers unfrozen at a time (sampled uniformly; embeddings and head always train).",
                      default=2)
    interval: int = doc("K: steps between resamplings of the unfrozen layers.", default=20)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, int) or self.layers < 1:
            raise SpliceError(f"lisa layers: must be a positive integer, got {self.layers!r}")
        if not isinstance(self.interval, int) or self.interval < 1:
            raise SpliceError(f"lisa interval: must be a positive integer, got {self.interval!r}")


@register_strategy("lisa", config=LisaConfig, reference="https://arxiv.org/abs/2403.17919")
class Lisa(TrainStrategy):
    """Freezes all but `layers` sampled layers every `interval` steps; the parts outside the layers always train."""

    def __init__(self, config: LisaConfig, params: Sequence[nn.Parameter], modules: Sequence[nn.Module],
                 total_steps: int, seed: int = 0):
        super().__init__(config, params, modules, total_steps, seed)
        found = layout(self.params, self.modules, "lisa")
        self.layers = [[p for unit in layer for p in unit.params] for layer in found.layers]
        trainable = [i for i, ps in enumerate(self.layers) if ps]
        if config.layers > len(trainable):
            raise SpliceError(f"lisa layers: {config.layers} is more than the {len(trainable)} layers with trained "
                              f"parameters in {found.layers_name}")
        self.candidates = trainable
        self.always = sum(p.numel() for u in found.outside for p in u.params) + sum(p.numel() for p in found.unowned)
        self.rng = random.Random(seed)
        self.active: list[int] = []
        self.history: list[list[int]] = []

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if step % self.config.interval:
            return
        self.active = sorted(self.rng.sample(self.candidates, self.config.layers))
        self.history.append(self.active)
        for i, params in enumerate(self.layers):
            on = i in self.active
            for p in params:
                p.requires_grad_(on)
            if not on:
                drop_state(optimizer, params)

    def close(self) -> None:
        for params in self.layers:
            for p in params:
                p.requires_grad_(True)

    def summary(self) -> dict[str, Any]:
        biggest = sorted((sum(p.numel() for p in ps) for ps in self.layers), reverse=True)[:self.config.layers]
        per_step = self.always + sum(biggest)
        return {"layers": len(self.candidates), "active_layers": self.config.layers, "resamplings": len(self.history),
                "trained_params": per_step, "grad_floats": per_step, "state_floats": 2 * per_step}
