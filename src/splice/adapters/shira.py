"""SHiRA: sparse high-rank adapters (Bhardwaj et al. 2024, https://arxiv.org/abs/2406.13175).

    ΔW = S          S: out×in, non-zero only on a fixed random set Ω of r·(in + out) entries
    y  = (W₀ + S) x + b          the values on Ω train (they start at 0 → ΔW = 0); Ω never changes

As many trained numbers as a rank-r LoRA, but the update is sparse and of high rank, and switching adapters touches
only the entries of Ω. `delta()` returns the `Sparse` form (flat indices + values), which `apply_to` adds in place.

Ω is PEFT's random mask: a permutation of the out·in positions from `torch.Generator()` seeded with `random_seed`
(unseeded: the generator's fixed default seed), its first r·(in + out) entries; the same seed gives PEFT's Ω.
PEFT's tensors: `shira_weight` (the values, row-major order of Ω) and `shira_indices` (2 × |Ω|: rows, columns).
Wraps nn.Linear.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.registry import register
from splice.adapters.targets import ATTENTION_ONLY_TARGETS
from splice.adapters.sparse import entries_matrix, layer_forward, random_flat_positions, with_entries
from splice.delta.forms import Delta, Sparse
from splice.errors import SpliceError


@dataclass
class ShiraConfig(AdapterConfig):
    """SHiRA hyper-parameters; field names and meanings follow PEFT's `ShiraConfig`."""

    r: int = doc("Sets the number of trained entries per module: r·(in + out), as many as a rank-r LoRA "
                 "(the update itself is not limited to rank r).", default=32)
    mask_type: Literal["random"] = doc("How the trained entries are chosen: 'random' (a seeded random mask).",
                                       default="random")
    random_seed: int | None = doc("Seed of the random mask (None: the generator's default seed, as in PEFT).",
                                  default=None)
    init_weights: bool = doc("Start the values at 0 (ΔW = 0); false draws them from N(0, 1).", default=True)

    peft_type: ClassVar[str | None] = "SHIRA"
    target_table: ClassVar[dict[str, list[str]]] = ATTENTION_ONLY_TARGETS

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise SpliceError(f"r: must be a positive integer, got {self.r!r}")
        if self.mask_type != "random":
            raise SpliceError(f"mask_type: only 'random' is supported, got {self.mask_type!r}")
        seed = self.random_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise SpliceError(f"random_seed: must be an integer or null, got {self.random_seed!r}")

    @classmethod
    def fields_from_peft(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        seed = cfg.get("random_seed")
        return {**super().fields_from_peft(cfg), "r": int(cfg.get("r", 32)),
                "mask_type": cfg.get("mask_type", "random"), "random_seed": None if seed is None else int(seed),
                "init_weights": bool(cfg.get("init_weights", True))}

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        return {**super().to_peft(base=base, kinds=kinds, adapters=adapters), "r": self.r,
                "mask_type": self.mask_type, "random_seed": self.random_seed, "init_weights": self.init_weights,
                "fan_in_fan_out": False}


def random_positions(out_f: int, in_f: int, count: int, seed: int | None) -> Tensor:
    """(2, count) rows and columns of `count` random positions of an out×in matrix, in row-major order."""
    flat = random_flat_positions(out_f * in_f, count, seed)
    return torch.stack([flat // in_f, flat % in_f])


@register("shira", config=ShiraConfig, reference="https://arxiv.org/abs/2406.13175")
class ShiraAdapter(nn.Module):
    """One SHiRA adapter on one nn.Linear: trained values on a fixed set of positions of its weight."""

    peft_keys: ClassVar[tuple[str, ...]] = ("shira_weight", "shira_indices")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: ShiraConfig) -> dict[str, tuple[int, ...]]:
        n = config.r * (base.in_features + base.out_features)
        return {"shira_weight": (n,), "shira_indices": (2, n)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        return None if {"shira_weight", "shira_indices"} <= tensors.keys() else "expected shira_weight and _indices"

    def __init__(self, base: nn.Module, kind: str, config: ShiraConfig):
        super().__init__()
        if kind != "linear":
            raise SpliceError(f"shira cannot wrap {type(base).__name__}; it wraps nn.Linear")
        out_f, in_f = base.out_features, base.in_features
        n = config.r * (in_f + out_f)
        if n > out_f * in_f:
            raise SpliceError(f"r: rank {config.r} means {n} trained entries, more than the layer's {out_f * in_f} "
                              f"({in_f} → {out_f})")
        dev, dt = base.weight.device, base.weight.dtype
        init = torch.zeros if config.init_weights else torch.randn
        self.shira_weight = nn.Parameter(init(n, device=dev, dtype=dt))
        self.register_buffer("shira_indices", random_positions(out_f, in_f, n, config.random_seed).to(dev))

    def flat_index(self, base: nn.Module) -> Tensor:
        rows, cols = self.shira_indices.long()
        return rows * base.in_features + cols

    def update(self, base: nn.Module) -> Tensor:
        """ΔW as a dense (out, in) matrix (differentiable in the values)."""
        return entries_matrix(base.weight.shape, self.flat_index(base), self.shira_weight)

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        # One matmul with W₀ + ΔW: the sparse values are scattered into a copy of W₀, as PEFT does.
        weight = with_entries(base.weight, self.flat_index(base), self.shira_weight)
        return layer_forward("linear", x, weight, base.bias)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        return layer_forward("linear", x, self.update(base), None).to(base_out.dtype)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        return {"weight": Sparse(self.flat_index(base), self.shira_weight.detach().clone(), base.weight.shape)}

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {"shira_weight": self.shira_weight.detach(), "shira_indices": self.shira_indices.to(torch.int32)}

    @classmethod
    def peft_problem(cls, tensors: dict[str, Tensor], base: nn.Module, kind: str, config: ShiraConfig) -> str | None:
        """Positions outside the weight, found before the loader touches the model."""
        indices = tensors["shira_indices"].long()
        if indices.numel() and (int(indices.min()) < 0 or int(indices[0].max()) >= base.out_features
                                or int(indices[1].max()) >= base.in_features):
            return f"shira_indices: positions outside the {tuple(base.weight.shape)} weight"
        return None

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        self.shira_indices = state["shira_indices"].long().to(self.shira_indices.device)
        self.shira_weight.copy_(state["shira_weight"])
