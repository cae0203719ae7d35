"""PaCA: partial connection adaptation (Woo et al. 2025, https://arxiv.org/abs/2503.01905).

Fine-tune r randomly chosen columns ("partial connections") of the pre-trained weight itself, with no adapter
layer in the forward path:

    ΔW[:, c] = s · D        c: r input columns drawn at random, D: out×r trained (starts at 0 → ΔW = 0), s = α/r
    y = W₀x + b + s · D x[c]

Only the r selected input features x[c] are kept for the backward pass (the paper's activation-memory saving);
the gradient of the frozen columns is never formed. Trained numbers per module: r·out.

As the authors' code (https://github.com/WooSunghyeon/paca): columns drawn uniformly at random (here seeded, each
module its own draw from `seed` and its name), scale paca_alpha / r with r = 8 and paca_alpha = 16 as in their
README. Their layer keeps the trained columns as a copy of W₀[:, c] / s and writes them into W; here D holds the
change (the same training dynamics under Adam without weight decay) so that the base weight is never written.
`delta()` is exact: LowRank(D, one-hot selection) or Sparse, whichever is smaller (`sparse.slice_delta`).

Wraps nn.Linear and HF Conv1D. Saved as `paca_w` (out, r) and `paca_indices` (r,); PEFT has no PaCA
(`peft_type: null`, `splice_method: paca`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.lora import module_dims
from splice.adapters.registry import register
from splice.adapters.sparse import (SeedPerModule, SliceUpdate, check_int, check_kind, check_positive_int, random_units,
                                    seed_of)
from splice.errors import SpliceError


@dataclass
class PacaConfig(SeedPerModule, AdapterConfig):
    """PaCA hyper-parameters; names follow the authors' `PacaConfig`."""

    r: int = doc("Number of input columns of each weight that train.", default=8)
    paca_alpha: float = doc("Scaling numerator: the trained columns change by paca_alpha / r · D.", default=16)
    seed: int = doc("Seed of the random column choice (mixed with each module's name).", default=0)

    params_formula: ClassVar[str] = "r·out (r input columns)"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_int("seed", self.seed)

    @property
    def scaling(self) -> float:
        return self.paca_alpha / self.r


@register("paca", config=PacaConfig, reference="https://arxiv.org/abs/2503.01905")
class PacaAdapter(SliceUpdate):
    """One PaCA adapter on one module: r trained input columns."""

    weight_key: ClassVar[str] = "paca_w"
    index_key: ClassVar[str] = "paca_indices"
    peft_keys: ClassVar[tuple[str, ...]] = (weight_key, index_key)

    @classmethod
    def axis_of(cls, base: nn.Module, kind: str, config: PacaConfig) -> str:
        return "in"

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: PacaConfig) -> dict[str, tuple[int, ...]]:
        return {cls.weight_key: cls.block_shape(base, kind, "in", config.r), cls.index_key: (config.r,)}

    def __init__(self, base: nn.Module, kind: str, config: PacaConfig):
        check_kind("paca", base, kind)
        in_f, out_f = module_dims(base, kind)
        if config.r > in_f:
            raise SpliceError(f"r: {config.r} columns asked, the layer has {in_f} ({in_f} → {out_f})")
        super().__init__(base, kind, random_units(in_f, config.r, seed_of(config)), "in", config.scaling)
