"""MiSS (formerly Bone): matrix shard sharing (Kang 2024, https://arxiv.org/abs/2409.15371).

One small trained block M is shared by every r-column shard of the weight:

    default    ΔW = [Mᵀ Mᵀ … Mᵀ]  (out × in; column j gets column j mod r of Mᵀ)      M: r × out, starts at 0
               y  = W₀x + b + Mᵀ (Σ_k x_k)          x_k: the k-th r-wide slice of x (zero-padded)
    mini       the same with M: r × mini_r repeated along the outputs (out / mini_r times)
    bat        per r×r block (i, j) of W₀: ΔW_ij = W₀_ij M_i + M_i       M: (out/r) × r × r, starts at 0
               ("Bat", Bone's block-affine variant: the update depends on the base weight)

The default and mini updates are exactly low rank: ΔW = Mᵀ·T with T (r × in) the tiled identity, which `delta()`
returns as LowRank. Bat's update is measured against the weight it is applied to (Dense); merge remembers it so
that unmerge restores the weight (exactly in float32, to rounding in bf16/fp16). PEFT's tensor: `miss_block`. Wraps nn.Linear.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.extras import RememberedMerge
from splice.adapters.registry import register
from splice.delta.forms import Delta, Dense, LowRank
from splice.errors import SpliceError


@dataclass
class MissConfig(AdapterConfig):
    """MiSS hyper-parameters; field names and meanings follow PEFT's `MissConfig`."""

    r: int = doc("Shard width along the inputs (the rank of the default update).", default=64)
    miss_dropout: float = doc("Dropout on the input of the MiSS branch (training only).", default=0.0)
    mini_r: int = doc("With init_weights='mini': width of M along the outputs (must divide out).", default=1)
    init_weights: bool | Literal["bat", "mini"] = doc(
        "true: the default shared shard, starting at 0; 'bat': Bone's block-affine update (r must divide in and "
        "out); 'mini': a smaller shard repeated along the outputs; false: the default, at random.", default=True)

    peft_type: ClassVar[str | None] = "MISS"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "mini_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpliceError(f"{name}: must be a positive integer, got {value!r}")
        if self.init_weights not in (True, False, "bat", "mini"):
            raise SpliceError(f"init_weights: must be true, false, 'bat' or 'mini', got {self.init_weights!r}")
        if not 0.0 <= float(self.miss_dropout) < 1.0:
            raise SpliceError(f"miss_dropout: must be in [0, 1), got {self.miss_dropout!r}")

    @classmethod
    def fields_from_peft(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        if cfg.get("bias", "none") != "none":
            raise SpliceError(f"bias={cfg['bias']!r} is not supported by splice's miss (only 'none')")
        init = cfg.get("init_weights", True)
        return {**super().fields_from_peft(cfg), "r": int(cfg.get("r", 64)), "mini_r": int(cfg.get("mini_r", 1)),
                "miss_dropout": float(cfg.get("miss_dropout", 0.0)),
                "init_weights": init if init in ("bat", "mini") else bool(init)}

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        return {**super().to_peft(base=base, kinds=kinds, adapters=adapters), "r": self.r, "mini_r": self.mini_r,
                "miss_dropout": self.miss_dropout, "init_weights": self.init_weights, "bias": "none"}


@register("miss", config=MissConfig, reference="https://arxiv.org/abs/2409.15371")
class MissAdapter(RememberedMerge, nn.Module):
    """One MiSS shard on one nn.Linear."""

    peft_keys: ClassVar[tuple[str, ...]] = ("miss_block",)

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: MissConfig) -> dict[str, tuple[int, ...]]:
        out_f, r = base.out_features, config.r
        if config.init_weights == "bat":
            return {"miss_block": (out_f // r, r, r)}
        return {"miss_block": (r, config.mini_r if config.init_weights == "mini" else out_f)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        return None if "miss_block" in tensors else "expected miss_block"

    def __init__(self, base: nn.Module, kind: str, config: MissConfig):
        super().__init__()
        if kind != "linear":
            raise SpliceError(f"miss cannot wrap {type(base).__name__}; it wraps nn.Linear")
        in_f, out_f, r = base.in_features, base.out_features, config.r
        if r > in_f:
            raise SpliceError(f"r: {r} is larger than the layer's {in_f} inputs")
        self.variant = "bat" if config.init_weights == "bat" else "mini" if config.init_weights == "mini" else "shard"
        if self.variant == "bat" and (in_f % r or out_f % r):
            raise SpliceError(f"r: bat needs r×r blocks, but r={r} does not divide the layer ({in_f} → {out_f})")
        if self.variant == "mini" and out_f % config.mini_r:
            raise SpliceError(f"mini_r: {config.mini_r} does not divide the layer's {out_f} outputs")
        self.r, self.in_f, self.out_f = r, in_f, out_f
        self.dropout = float(config.miss_dropout)
        shape = self.peft_shapes(base, kind, config)["miss_block"]
        self.miss_block = nn.Parameter(torch.zeros(shape, device=base.weight.device, dtype=base.weight.dtype))
        if config.init_weights is False:
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))

    def shard(self) -> Tensor:
        """M as r × out (mini's block repeated along the outputs)."""
        if self.variant == "mini":
            return self.miss_block.repeat(1, self.out_f // self.miss_block.shape[1])
        return self.miss_block

    def bat_update(self, W: Tensor) -> Tensor:
        """Bat's ΔW for weight W: block (i, j) is W_ij M_i + M_i."""
        r, M = self.r, self.miss_block
        blocks = W.to(M.dtype).reshape(self.out_f // r, r, self.in_f // r, r).permute(2, 0, 1, 3)  # (j, i, r, r)
        return (blocks @ M + M).permute(1, 2, 0, 3).reshape(self.out_f, self.in_f)

    def tiling(self) -> Tensor:
        """T (r × in): T[k, j] = 1 where j mod r = k, so that ΔW = Mᵀ T."""
        cols = torch.arange(self.in_f, device=self.miss_block.device)
        return (cols[None, :] % self.r == torch.arange(self.r, device=cols.device)[:, None]).to(self.miss_block.dtype)

    # -- forward -------------------------------------------------------------------------------------------------
    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        xd = F.dropout(x, self.dropout, self.training) if self.dropout else x
        if self.variant == "bat":
            return F.linear(xd.to(self.miss_block.dtype), self.bat_update(base.weight)).to(base_out.dtype)
        pad = (self.r - self.in_f % self.r) % self.r
        xs = F.pad(xd.to(self.miss_block.dtype), (0, pad))
        summed = xs.reshape(*xs.shape[:-1], -1, self.r).sum(-2)  # (…, r): Σ_k x_k
        return (summed @ self.shard()).to(base_out.dtype)

    # -- the delta -----------------------------------------------------------------------------------------------
    def delta(self, base: nn.Module) -> dict[str, Delta]:
        with torch.no_grad():
            if self.variant == "bat":
                return {"weight": Dense(self.bat_update(base.weight))}
            return {"weight": LowRank(self.shard().t().contiguous(), self.tiling(), 1.0, base.weight.shape)}

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {"miss_block": self.miss_block.detach()}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        self.miss_block.copy_(state["miss_block"])
