"""SVFit: fine-tune the top singular values of the pre-trained weight (Sun et al. 2024,
https://arxiv.org/abs/2409.05926).

    W₀ = U S Vᵀ                  thin SVD of the frozen weight, in float32; U_r, V_r: its top-r singular vectors
    ΔW = U_r diag(Δs) V_rᵀ       Δs: r numbers, the only trained ones; they start at 0 → ΔW = 0
    y  = W₀x + b + U_r (Δs ∘ (V_rᵀ x))

The paper splits W₀ = W_r + W_e with W_r = U_r diag(s) V_rᵀ and trains s starting from the top-r singular values
S_r; training Δs = s − S_r instead is the same model with the same gradients (only weight decay differs: it pulls
toward the pre-trained spectrum rather than toward 0). The paper chooses r so that the top-r singular values hold
over 99% of the spectrum; here r is a field (default 8, the rank the other methods are compared at).

Trainable parameters per module: r. `delta()` is exact and low rank: LowRank(U_r diag(Δs), V_rᵀ). The frozen U_r
and V_rᵀ are persistent buffers saved with the adapter (r·(in + out) numbers, the size of a rank-r LoRA), so a
folder means the same update on any machine, whatever sign or rounding another SVD would give. PEFT has no SVFit:
the folder says `peft_type: null`, `splice_method: "svfit"`. Wraps nn.Linear and HF Conv1D.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.registry import register
from splice.adapters.svd_common import Factored, check_kind, check_rank, dtype_of, positive_int, svd, weight_matrix


@dataclass
class SVFitConfig(AdapterConfig):
    """SVFit hyper-parameters."""

    r: int = doc("How many of the largest singular values train (the update has rank ≤ r).", default=8)

    params_formula: ClassVar[str] = "r (the offsets Δs of the top-r singular values)"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self.r, "r")


@register("svfit", config=SVFitConfig, reference="https://arxiv.org/abs/2409.05926")
class SVFitAdapter(Factored):
    """Trained offsets Δs of the top-r singular values of one module's weight."""

    peft_keys: ClassVar[tuple[str, ...]] = ("svfit_delta", "svfit_U", "svfit_Vh")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: SVFitConfig) -> dict[str, tuple[int, ...]]:
        in_f, out_f = check_kind("svfit", base, kind)
        return {"svfit_delta": (config.r,), "svfit_U": (out_f, config.r), "svfit_Vh": (config.r, in_f)}

    def __init__(self, base: nn.Module, kind: str, config: SVFitConfig):
        super().__init__()
        in_f, out_f = check_kind("svfit", base, kind)
        check_rank(config.r, in_f, out_f)
        self.kind = kind
        U, _, Vh = svd(weight_matrix(base, kind))
        dt = dtype_of(base)
        self.svfit_delta = nn.Parameter(torch.zeros(config.r, device=U.device, dtype=dt))
        self.register_buffer("svfit_U", U[:, : config.r].to(dt).contiguous())  # (out, r)
        self.register_buffer("svfit_Vh", Vh[: config.r].to(dt).contiguous())  # (r, in)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.svfit_U * self.svfit_delta, self.svfit_Vh
