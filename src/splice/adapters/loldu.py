"""LoLDU: low-rank adaptation via lower-diag-upper decomposition (Shi et al. 2024, https://arxiv.org/abs/2410.13618).

    W₀ = P L D U                  LU with partial pivoting of the frozen weight (torch.linalg.lu, float32), D the
                                  diagonal of the pivots, U scaled to a unit diagonal (L is unit lower already)
    L_r = (P L)[:, :r]            out×r, frozen        U_r = U[:r]   r×in, frozen
    W   = W_res + σ · L_r diag(z) U_r      z (r) and σ (a scalar) train; z starts at D[:r], σ at lora_alpha / r
    ΔW  = L_r diag(σ z − σ₀ z₀) U_r        (exact, rank ≤ r)

As in the paper's code, the initial low-rank part σ₀ L_r diag(z₀) U_r is taken out of the weight (like PiSSA), so
the model starts as the base: W_res = W₀ − σ₀ L_r diag(z₀) U_r. splice never rewrites the base weight; the layer
subtracts the frozen σ₀ z₀ itself, which is the same thing. Only the diagonal z and the scale σ train (the paper's
"optimizing the diagonal matrix for scaling transformations"); P, L, U are frozen. The authors' code creates σ as a
parameter but its training filter (`get_loldu_params`) collects z alone; splice trains both (r + 1 numbers).

σ₀ = lora_alpha / r with lora_alpha = 1 by default, the authors' code's `from_linear` default. The authors' example
config uses a large rank (768, every LU direction of a RoBERTa-base layer); r here defaults to 8, the rank the other
methods are compared at; r = min(in, out) gives the full-rank variant.

Trainable parameters per module: r + 1. The frozen L_r, U_r and σ₀z₀ are persistent buffers saved with the
adapter. PEFT has no LoLDU: the folder says `peft_type: null`, `splice_method: "loldu"`. Wraps nn.Linear and HF
Conv1D.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.registry import register
from splice.adapters.svd_common import Factored, check_kind, check_rank, dtype_of, positive_int, weight_matrix
from splice.errors import SpliceError


@dataclass
class LoLDUConfig(AdapterConfig):
    """LoLDU hyper-parameters; names follow the authors' code (rank → r, lora_alpha)."""

    r: int = doc("How many LDU components (leading columns of P·L, rows of U) the update uses.", default=8)
    lora_alpha: float = doc("The trained scale σ starts at lora_alpha / r.", default=1.0)

    params_formula: ClassVar[str] = "r + 1 (the diagonal z and the scale σ)"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self.r, "r")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha == 0:
            raise SpliceError(f"lora_alpha: must be a non-zero number, got {self.lora_alpha!r}")


def ldu(W: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """(P L)[:, :r] (out, r), the unit-diagonal U[:r] (r, in) and the pivots D[:r] (r,) of W = P L D U."""
    P, L, U = torch.linalg.lu(W.float())  # P (out, out), L (out, k), U (k, in), k = min(out, in)
    D = torch.diagonal(U)
    # A zero pivot leaves its row of U as it is (that component then starts at 0 and trains from there).
    U = U / torch.where(D == 0, torch.ones_like(D), D)[:, None]
    return (P @ L[:, :r]).contiguous(), U[:r].contiguous(), D[:r].contiguous()


@register("loldu", config=LoLDUConfig, reference="https://arxiv.org/abs/2410.13618")
class LoLDUAdapter(Factored):
    """One LoLDU adapter: the trained diagonal z and scale σ over the frozen LU factors."""

    peft_keys: ClassVar[tuple[str, ...]] = ("loldu_z", "loldu_scale", "loldu_L", "loldu_U", "loldu_start")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: LoLDUConfig) -> dict[str, tuple[int, ...]]:
        in_f, out_f = check_kind("loldu", base, kind)
        r = config.r
        return {"loldu_z": (r,), "loldu_scale": (1,), "loldu_L": (out_f, r), "loldu_U": (r, in_f),
                "loldu_start": (r,)}

    def __init__(self, base: nn.Module, kind: str, config: LoLDUConfig):
        super().__init__()
        in_f, out_f = check_kind("loldu", base, kind)
        check_rank(config.r, in_f, out_f)
        self.kind = kind
        L, U, D = ldu(weight_matrix(base, kind), config.r)
        dt, scale = dtype_of(base), config.lora_alpha / config.r
        self.loldu_z = nn.Parameter(D.to(dt))
        self.loldu_scale = nn.Parameter(torch.full((1,), scale, device=D.device, dtype=dt))
        self.register_buffer("loldu_L", L.to(dt))
        self.register_buffer("loldu_U", U.to(dt))
        # σ₀ z₀, subtracted: ΔW is exactly 0 at the start (the same product the forward computes)
        self.register_buffer("loldu_start", (self.loldu_scale * self.loldu_z).detach().clone())

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.loldu_L * (self.loldu_scale * self.loldu_z - self.loldu_start), self.loldu_U
