"""HFT: Half Fine-Tuning (Hui et al. 2024, https://arxiv.org/abs/2404.18466; catalogue #20).

Each round, half of the parameters are selected to train and the other half stay frozen at their current values
(the paper reads the selection as a regulariser that keeps pre-trained knowledge). The paper selects at the
*category level* (its Figure 2, LLaMA 2): inside each transformer layer, half of the self-attention matrices, half
of the feed-forward matrices and half of the norms train; outside the layers, likewise half of each category
(embedding / head, norms). With θ the parameters and M_t the round's binary selection:

    θ_{t+1} = θ_t − η · M_t ⊙ AdamW_t(∇L(θ_t)),   M_t = one random half of each category's matrices

Here the unit is a module's own parameters (a Linear's weight with its bias, a norm's scale and shift, a LoRA
adapter's A and B), grouped per layer into attention (the module's name within the layer has "attn" or
"attention"), norm (a *Norm class, or "norm" in the name) and feed-forward (everything else); outside the layers,
into embeddings (nn.Embedding), norms and other. A category with an odd count trains ⌊n/2⌋ or ⌈n/2⌉ units, by a
fair coin. For a BERT layer that is exactly 2 of {query, key, value, attention output}, 1 of {intermediate, output}
and 1 of its 2 LayerNorms. Frozen units have requires_grad off (no gradient) and their optimizer state is dropped.

Defaults: the paper selects once per training stage (its "round" is a stage: SFT, DPO, one task of continual
learning), so `interval` 0 selects once for the whole run; a positive `interval` re-selects every K steps.
`fraction` 0.5 is the method (the "half"); other values are the same mechanism with another share.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splice.adapters.config import doc
from splice.errors import SpliceError
from splice.train.optim.blocks import Unit, drop_state, layout
from splice.train.optim.registry import StrategyConfig, TrainStrategy, register_strategy


@dataclass
class HftConfig(StrategyConfig):
    """HFT's options: the share of each category that trains, and how often the selection is redrawn."""

    fraction: float = doc("Share of each category's matrices that train per round (the paper: half).",
                          default=0.5)
    interval: int = doc("Steps per round: the selection is redrawn every `interval` steps (0: once per run, as "
                        "the paper does per training stage).", default=0)

    def __post_init__(self) -> None:
        if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction < 1:
            raise SpliceError(f"hft fraction: must be in (0, 1), got {self.fraction!r}")
        if not isinstance(self.interval, int) or self.interval < 0:
            raise SpliceError(f"hft interval: must be a non-negative integer, got {self.interval!r}")


def category(unit: Unit, prefix: str, inside: bool) -> str:
    """The unit's category: inside a layer attention / norm / feed-forward, outside embedding / norm / other."""
    local = unit.name[len(prefix):].lower() if unit.name.startswith(prefix) else unit.name.lower()
    plain = getattr(unit.module, "base", unit.module)
    if "norm" in type(plain).__name__.lower() or any("norm" in part for part in local.split(".")):
        return "norm"
    if inside:
        return "attention" if "attn" in local or "attention" in local else "feed_forward"
    return "embedding" if isinstance(plain, nn.Embedding) else "other"


@register_strategy("hft", config=HftConfig, reference="https://arxiv.org/abs/2404.18466")
class Hft(TrainStrategy):
    """Trains a random half of each category's units per round; the other half is frozen."""

    def __init__(self, config: HftConfig, params: Sequence[nn.Parameter], modules: Sequence[nn.Module],
                 total_steps: int, seed: int = 0):
        super().__init__(config, params, modules, total_steps, seed)
        found = layout(self.params, self.modules, "hft")
        groups: dict[tuple[int, str], list[Unit]] = {}
        for i, (layer, prefix) in enumerate(zip(found.layers, found.prefixes)):
            for unit in layer:
                groups.setdefault((i, category(unit, prefix, True)), []).append(unit)
        for unit in found.outside:
            groups.setdefault((-1, category(unit, "", False)), []).append(unit)
        self.groups = groups
        self.units = [u for us in groups.values() for u in us]
        self.rng = random.Random(seed)
        self.selected: list[Unit] = []
        self.rounds = 0

    def _take(self, n: int) -> int:
        exact = n * self.config.fraction
        low = math.floor(exact)
        return low + (1 if exact > low and self.rng.random() < exact - low else 0)

    def select(self) -> list[Unit]:
        """Draw this round's units: `fraction` of each (layer, category) group."""
        chosen = []
        for units in self.groups.values():
            chosen += self.rng.sample(units, self._take(len(units)))
        return chosen

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        interval = self.config.interval
        if step != 0 and not (interval and step % interval == 0):
            return
        self.selected = self.select()
        self.rounds += 1
        on = {id(u) for u in self.selected}
        for unit in self.units:
            for p in unit.params:
                p.requires_grad_(id(unit) in on)
            if id(unit) not in on:
                drop_state(optimizer, unit.params)

    def close(self) -> None:
        for unit in self.units:
            for p in unit.params:
                p.requires_grad_(True)

    def summary(self) -> dict[str, Any]:
        managed = {id(p) for u in self.units for p in u.params}
        trained = sum(u.numel for u in self.selected) + sum(p.numel() for p in self.params if id(p) not in managed)
        return {"rounds": self.rounds, "units": len(self.units), "trained_units": len(self.selected),
                "trained_params": trained, "grad_floats": trained, "state_floats": 2 * trained}

