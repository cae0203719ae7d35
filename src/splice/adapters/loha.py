"""LoHa: low-rank Hadamard product (FedPara, Hyeon-Woo et al. 2022, https://arxiv.org/abs/2108.06098; as used in
LyCORIS, https://arxiv.org/abs/2309.14859).

    ΔW = (α/r) · (W1a W1b) ∘ (W2a W2b)          W1a, W2a: out×r   W1b, W2b: r×in   (∘: elementwise)
    y  = W₀x + b + ΔW x                          W2b starts at 0 → ΔW = 0 at init

The Hadamard product of two rank-r matrices has rank up to r², from 4·r·(in+out) parameters. The product is exactly
a rank-r² LowRank (Khatri–Rao): ΔW_ij = Σ_{k,l} (W1a_ik W2a_il)(W1b_kj W2b_lj), which `delta()` returns when it is
smaller than the dense matrix.

On nn.Conv2d the kernel is flattened to out × (in·kh·kw), or, with `use_effective_conv2d`, each factor is a CP
decomposition: W = einsum(T (r,r,kh,kw), W_b (r,in), W_a (r,out)) (FedPara's Proposition 3).
PEFT's tensors: hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (and hada_t1, hada_t2 for the CP form).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from splice.adapters.config import doc
from splice.adapters.lora import module_dims
from splice.adapters.lycoris import (LycorisConfig, PeftKeysState, apply_update, check_kind, drop_rows, effective_conv,
                                     skip_module)
from splice.adapters.registry import register
from splice.delta.forms import Delta, Dense, LowRank
from splice.errors import SpliceError


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa hyper-parameters; field names and meanings follow PEFT's `LoHaConfig`."""

    init_weights: bool = doc("Start W2b at 0 (ΔW = 0); false initialises every factor at random.", default=True)

    peft_type: ClassVar[str | None] = "LOHA"

    @classmethod
    def fields_from_peft(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {**super().fields_from_peft(cfg), "init_weights": bool(cfg.get("init_weights", True))}

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        return {**super().to_peft(base=base, kinds=kinds, adapters=adapters), "init_weights": self.init_weights}


def cp_weight(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """The (out, in, kh, kw) kernel of a CP factor: t (r, r, kh, kw), wa (r, out), wb (r, in)."""
    return torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)


@register("loha", config=LoHaConfig, reference="https://arxiv.org/abs/2108.06098")
class LoHaAdapter(PeftKeysState, nn.Module):
    """One LoHa adapter on one nn.Linear or nn.Conv2d."""

    peft_keys: ClassVar[tuple[str, ...]] = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: LoHaConfig) -> dict[str, tuple[int, ...]]:
        in_f, out_f = module_dims(base, kind)
        r = config.r
        if effective_conv(config, base, kind):
            kh, kw = base.kernel_size
            return {"hada_w1_a": (r, out_f), "hada_w1_b": (r, in_f), "hada_t1": (r, r, kh, kw),
                    "hada_w2_a": (r, out_f), "hada_w2_b": (r, in_f), "hada_t2": (r, r, kh, kw)}
        flat = in_f * math.prod(base.kernel_size) if kind == "conv2d" else in_f
        return {"hada_w1_a": (out_f, r), "hada_w1_b": (r, flat), "hada_w2_a": (out_f, r), "hada_w2_b": (r, flat)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        return None if need <= tensors.keys() else f"expected {', '.join(sorted(need))}"

    def __init__(self, base: nn.Module, kind: str, config: LoHaConfig):
        super().__init__()
        check_kind(config.method, base, kind)
        in_f, out_f = module_dims(base, kind)
        if config.r > min(in_f, out_f):
            raise SpliceError(f"r: rank {config.r} is larger than the layer ({in_f} → {out_f})")
        self.kind = kind
        self.scale = config.scaling
        self.rank_dropout, self.module_dropout = float(config.rank_dropout), float(config.module_dropout)
        dev, dt = base.weight.device, base.weight.dtype
        for key, shape in self.peft_shapes(base, kind, config).items():
            setattr(self, key, nn.Parameter(torch.empty(shape, device=dev, dtype=dt)))
        self.cp = hasattr(self, "hada_t1")
        with torch.no_grad():
            for p in self.parameters():
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            if config.init_weights:
                nn.init.zeros_(self.hada_w2_b)

    def weight(self, base: nn.Module) -> Tensor:
        """ΔW, shaped like the base weight."""
        if self.cp:
            w1 = cp_weight(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            w2 = cp_weight(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        else:
            w1, w2 = self.hada_w1_a @ self.hada_w1_b, self.hada_w2_a @ self.hada_w2_b
        return (w1 * w2 * self.scale).reshape(base.weight.shape)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        if skip_module(self):
            return torch.zeros_like(base_out)
        weight = self.weight(base)
        if self.training and self.rank_dropout:
            weight = drop_rows(weight, self.rank_dropout, rescale=True)
        return apply_update(x, weight, base, self.kind).to(base_out.dtype)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        with torch.no_grad():
            if self.cp:
                return {"weight": Dense(self.weight(base))}
            out_f, r2, flat = self.hada_w1_a.shape[0], self.hada_w1_a.shape[1] * self.hada_w2_a.shape[1], \
                self.hada_w1_b.shape[1]
            if r2 * (out_f + flat) >= out_f * flat:  # the rank-r² form would not be smaller
                return {"weight": Dense(self.weight(base))}
            B = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(out_f, r2)  # Khatri–Rao (rows)
            A = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r2, flat)  # (columns)
            return {"weight": LowRank(B, A, self.scale, base.weight.shape)}
