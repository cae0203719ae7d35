"""LoKr: low-rank Kronecker product (KronA, Edalati et al. 2022, https://arxiv.org/abs/2212.10650; as used in
LyCORIS, https://arxiv.org/abs/2309.14859).

    ΔW = (α/r) · W1 ⊗ W2          W1: a×c, W2: b×d, with out = a·b and in = c·d
    y  = W₀x + b + ΔW x

out and in are each split into two factors near their square root (or `decompose_factor`, PEFT's `factorization`).
W2 is itself low rank (W2a W2b, rank r) unless r ≥ max(b, d)/2, and W1 is low rank only with `decompose_both`.
By default W1 starts at 0, so ΔW = 0 at init. `delta()` returns the `Kron` form: a·c + b·d numbers for the whole
out × in update.

On nn.Conv2d W2 carries the kernel: b × d × kh × kw (flattened in its low-rank form, or a CP factor with
`use_effective_conv2d`). PEFT's tensors: lokr_w1 or lokr_w1_a/_b, lokr_w2 or lokr_w2_a/_b (and lokr_t2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from splice.adapters.config import doc
from splice.adapters.loha import cp_weight
from splice.adapters.lora import module_dims
from splice.adapters.lycoris import (LycorisConfig, PeftKeysState, apply_update, check_kind, drop_rows, effective_conv,
                                     skip_module)
from splice.adapters.registry import register
from splice.delta.forms import Delta, Kron
from splice.errors import SpliceError


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr hyper-parameters; field names and meanings follow PEFT's `LoKrConfig`."""

    decompose_both: bool = doc("Also factor the left Kronecker factor W1 as a rank-r product.", default=False)
    decompose_factor: int = doc(
        "Preferred size of the first factor of each dimension; -1 splits near the square root. A factor that does "
        "not divide a dimension is a bound for the search, as in PEFT.", default=-1)
    rank_dropout_scale: bool = doc("Rescale the update by the fraction of rows kept by rank dropout.", default=False)
    init_weights: bool | Literal["lycoris"] = doc(
        "true: W1 starts at 0 (ΔW = 0); 'lycoris': W2 starts at 0 instead; false: every factor at random.",
        default=True)

    peft_type: ClassVar[str | None] = "LOKR"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int) or \
                (self.decompose_factor < 1 and self.decompose_factor != -1):
            raise SpliceError(f"decompose_factor: must be -1 or a positive integer, got {self.decompose_factor!r}")
        if self.init_weights not in (True, False, "lycoris"):
            raise SpliceError(f"init_weights: must be true, false or 'lycoris', got {self.init_weights!r}")

    @classmethod
    def fields_from_peft(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        init = cfg.get("init_weights", True)
        return {**super().fields_from_peft(cfg), "decompose_both": bool(cfg.get("decompose_both", False)),
                "decompose_factor": int(cfg.get("decompose_factor", -1)),
                "rank_dropout_scale": bool(cfg.get("rank_dropout_scale", False)),
                "init_weights": init if init == "lycoris" else bool(init)}

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        return {**super().to_peft(base=base, kinds=kinds, adapters=adapters), "decompose_both": self.decompose_both,
                "decompose_factor": self.decompose_factor, "rank_dropout_scale": self.rank_dropout_scale,
                "init_weights": self.init_weights}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension: (factor, dimension/factor) when factor divides it, else the pair closest to the
    square root with m ≤ factor (PEFT's and LyCORIS's rule, so that shapes agree with their files)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def layout(base: nn.Module, kind: str, config: LoKrConfig) -> dict[str, tuple[int, ...]]:
    """PEFT's tensor names and shapes for this module (which factors are full, which low rank)."""
    in_f, out_f = module_dims(base, kind)
    (a, b), (c, d) = factorization(out_f, config.decompose_factor), factorization(in_f, config.decompose_factor)
    r = config.r
    kernel = tuple(base.kernel_size) if kind == "conv2d" else ()
    shapes: dict[str, tuple[int, ...]] = {}
    if config.decompose_both and r < max(a, c) / 2:
        shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
    else:
        shapes["lokr_w1"] = (a, c)
    if r >= max(b, d) / 2:
        shapes["lokr_w2"] = (b, d, *kernel)
    elif effective_conv(config, base, kind):
        shapes.update(lokr_w2_a=(r, b), lokr_w2_b=(r, d), lokr_t2=(r, r, *kernel))
    else:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(kernel)))
    return shapes


@register("lokr", config=LoKrConfig, reference="https://arxiv.org/abs/2212.10650")
class LoKrAdapter(PeftKeysState, nn.Module):
    """One LoKr adapter on one nn.Linear or nn.Conv2d."""

    peft_keys: ClassVar[tuple[str, ...]] = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                            "lokr_t2")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: LoKrConfig) -> dict[str, tuple[int, ...]]:
        return layout(base, kind, config)

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        w1 = "lokr_w1" in tensors or {"lokr_w1_a", "lokr_w1_b"} <= tensors.keys()
        w2 = "lokr_w2" in tensors or {"lokr_w2_a", "lokr_w2_b"} <= tensors.keys()
        return None if w1 and w2 else "expected lokr_w1 (or lokr_w1_a and _b) and lokr_w2 (or lokr_w2_a and _b)"

    def __init__(self, base: nn.Module, kind: str, config: LoKrConfig):
        super().__init__()
        check_kind(config.method, base, kind)
        self.kind = kind
        self.scale = config.scaling
        self.rank_dropout, self.module_dropout = float(config.rank_dropout), float(config.module_dropout)
        self.rank_dropout_scale = config.rank_dropout_scale
        dev, dt = base.weight.device, base.weight.dtype
        for key, shape in layout(base, kind, config).items():
            setattr(self, key, nn.Parameter(torch.empty(shape, device=dev, dtype=dt)))
        with torch.no_grad():
            for p in self.parameters():
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            if config.init_weights is True:  # W1 (or its first factor) at 0
                nn.init.zeros_(self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a)
            elif config.init_weights == "lycoris":  # W2 (or its second factor) at 0
                nn.init.zeros_(self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_b)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(W1, W2) as matrices: a × c and b × (d·kh·kw)."""
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2
        elif hasattr(self, "lokr_t2"):
            w2 = cp_weight(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2.reshape(w2.shape[0], -1)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        if skip_module(self):
            return torch.zeros_like(base_out)
        w1, w2 = self.factors()
        weight = (torch.kron(w1, w2) * self.scale).reshape(base.weight.shape)
        if self.training and self.rank_dropout:
            weight = drop_rows(weight, self.rank_dropout, rescale=self.rank_dropout_scale)
        return apply_update(x, weight, base, self.kind).to(base_out.dtype)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        with torch.no_grad():
            w1, w2 = self.factors()
            return {"weight": Kron(w1.clone(), w2.clone(), self.scale, base.weight.shape)}
