"""S2FT: structured sparse fine-tuning (Yang et al. 2024, https://arxiv.org/abs/2412.06289).

"Selecting sparsely and computing densely": a few attention heads and FFN channels are chosen per block, and the
weights coupled to them are updated as dense sub-blocks — the input columns of the projection that reads them
(attention output projection, FFN down projection) or the output rows of the projection that writes them (Q, K,
V, FFN up and gate projections):

    columns:  ΔW[:, c] = D     c: the chosen channels (whole heads with head_dim), D: out×|c| trained
    rows:     ΔW[c, :] = E     E: |c|×in trained                 (D, E start at 0 → ΔW = 0)
    |c| = ⌈ratio · units⌉ per module, units = channels, or heads when head_dim is set

The paper co-permutes the coupled weights so that the chosen rows/columns are contiguous and trains them in place
with partial backpropagation; here the base is never written: the block holds the change, the forward adds
D x[c] (only the chosen input columns are kept for backward) or writes E x into the chosen outputs, and `delta()`
is the exact update as LowRank with a one-hot selection factor or Sparse, whichever is smaller.

Defaults, from the released code's training script (`finetune.sh`: `--u_ratio 0.013 --d_ratio 0.013`): channels
drawn uniformly at random (the paper's default strategy; seeded here, each module its own draw from `seed` and its
name), ratio 0.013 (1.3% of the channels). That script trains the FFN only (up/gate rows and down columns); the
default targets here are the projections that read the chosen heads and channels — the attention output and FFN
down projections, trained by columns — and `row_modules` names the projections trained by rows when targeted.
Heads are whole blocks of `head_dim` columns/rows in `head_modules` when head_dim is given (the model's head size:
32 for MiniLM, 64 for BERT-base); left unset, single channels are chosen everywhere (a module cannot see the
model's head count). Each module draws its own channels (the paper couples up and gate through one choice per
block).

Wraps nn.Linear and HF Conv1D (rows and columns of the (out, in) matrix the layer computes with). Saved as
`s2ft_weight` and `s2ft_indices`; PEFT has no S2FT (`peft_type: null`, `splice_method: s2ft`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.inject import _matches
from splice.adapters.lora import module_dims
from splice.adapters.registry import register
from splice.adapters.sparse import (SeedPerModule, SliceUpdate, check_fraction, check_int, check_kind, count_of,
                                    random_units, seed_of)
from splice.errors import SpliceError

ROW_MODULES = ["query", "key", "value", "intermediate.dense", "q_proj", "k_proj", "v_proj", "up_proj", "gate_proj",
               "c_attn", "c_fc", "fc1"]
HEAD_MODULES = ["attention.output.dense", "o_proj", "attn.c_proj", "out_proj", "query", "key", "value", "q_proj",
                "k_proj", "v_proj", "c_attn"]


@dataclass
class S2FTConfig(SeedPerModule, AdapterConfig):
    """S2FT hyper-parameters."""

    target_modules: list[str] | str = doc(
        "Modules to wrap (name suffixes, one regex, or 'all-linear'); by default the projections that read the "
        "chosen heads and channels: attention output and FFN down projections.",
        default_factory=lambda: ["output.dense", "o_proj", "down_proj", "c_proj"])
    ratio: float = doc("Fraction of each module's channels (heads, with head_dim) that train.", default=0.013)
    row_modules: list[str] = doc("Modules (name suffixes) trained by output rows (Q, K, V, FFN up/gate); every "
                                 "other target is trained by input columns.", default_factory=lambda: list(ROW_MODULES))
    head_dim: int | None = doc("Head size: in head_modules whole heads of this many channels are chosen (None: "
                               "single channels everywhere).", default=None)
    head_modules: list[str] = doc("Modules (name suffixes) whose chosen side is split into attention heads.",
                                  default_factory=lambda: list(HEAD_MODULES))
    seed: int = doc("Seed of the random choice of channels (mixed with each module's name).", default=0)

    params_formula: ClassVar[str] = ("⌈ratio·in⌉·out (input columns), or ⌈ratio·out⌉·in for row_modules; "
                                     "with head_dim, whole heads: ⌈ratio·in/head_dim⌉·head_dim·out")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("ratio", self.ratio)
        if self.head_dim is not None and (isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int)
                                          or self.head_dim < 1):
            raise SpliceError(f"head_dim: must be a positive integer or null, got {self.head_dim!r}")
        for name in ("row_modules", "head_modules"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise SpliceError(f"{name}: must be a list of module name suffixes, got {value!r}")
            setattr(self, name, list(value))
        check_int("seed", self.seed)

    def for_target(self, name: str) -> "S2FTConfig":
        config = super().for_target(name)
        config.module_axis = "out" if _matches(name, self.row_modules) else "in"  # not fields: per module
        config.module_width = self.head_dim if self.head_dim and _matches(name, self.head_modules) else 1
        return config


def selection(base: nn.Module, kind: str, config: S2FTConfig) -> tuple[str, int, int]:
    """(axis, unit width, number of units) of the block this module trains."""
    in_f, out_f = module_dims(base, kind)
    axis, width = getattr(config, "module_axis", "in"), getattr(config, "module_width", 1)
    size = in_f if axis == "in" else out_f
    if size % width:
        side = "input columns" if axis == "in" else "output rows"
        raise SpliceError(f"head_dim: {width} does not divide the layer's {size} {side} ({in_f} → {out_f})")
    return axis, width, count_of(config.ratio, size // width)


@register("s2ft", config=S2FTConfig, reference="https://arxiv.org/abs/2412.06289")
class S2FTAdapter(SliceUpdate):
    """One S2FT adapter on one module: a trained block of chosen input columns or output rows."""

    weight_key: ClassVar[str] = "s2ft_weight"
    index_key: ClassVar[str] = "s2ft_indices"
    peft_keys: ClassVar[tuple[str, ...]] = (weight_key, index_key)

    @classmethod
    def axis_of(cls, base: nn.Module, kind: str, config: S2FTConfig) -> str:
        return selection(base, kind, config)[0]

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: S2FTConfig) -> dict[str, tuple[int, ...]]:
        axis, width, count = selection(base, kind, config)
        return {cls.weight_key: cls.block_shape(base, kind, axis, count * width), cls.index_key: (count * width,)}

    def __init__(self, base: nn.Module, kind: str, config: S2FTConfig):
        check_kind("s2ft", base, kind)
        axis, width, count = selection(base, kind, config)
        in_f, out_f = module_dims(base, kind)
        idx = random_units(in_f if axis == "in" else out_f, count, seed_of(config), width)
        super().__init__(base, kind, idx, axis)
