"""SORSA: singular values and orthonormal regularized singular vectors adaptation (Cao 2024,
https://arxiv.org/abs/2409.00055).

    W₀ = W_res + U_p diag(S_p) V_pᵀ      top-r SVD of the frozen weight (float32): the principal part trains,
                                          the residual W_res = W₀ − U_p⁰ diag(S_p⁰) V_p⁰ᵀ stays frozen
    y  = W₀x + b + (U_p diag(S_p) V_pᵀ − U_p⁰ diag(S_p⁰) V_p⁰ᵀ) x
    L  = L_task + γ · mean over modules (‖U_pᵀU_p − I‖²_F + ‖V_pᵀV_p − I‖²_F)

U_p (out×r), S_p (r) and V_p (in×r, stored as V_pᵀ) all train; they start at the SVD's own values, so the model
starts as the base. The base weight is never rewritten: the layer subtracts the frozen start U_p⁰ S_p⁰ V_p⁰ᵀ
itself (as PiSSA does here), so the update against the original base is

    ΔW = U_p diag(S_p) V_pᵀ − U_p⁰ diag(S_p⁰) V_p⁰ᵀ,

exact as a LowRank of rank ≤ 2r ([U_p S_p, −U_p⁰ S_p⁰] · [V_pᵀ; V_p⁰ᵀ]); merging adds it to W₀.

The orthonormal regulariser keeps U_p and V_p near the Stiefel manifold. It is added to the loss by the training
hook (`SorsaConfig.training_hook(...).loss()`), so it runs in the one training loop: the authors' code likewise
back-propagates γ·L_reg into the same gradients before the optimizer step. γ defaults to 4e-4, the authors'
training script's value. The paper writes squared Frobenius norms (used here); the authors' code sums the
unsquared norms. No update scale: the authors' default (alpha None → scale 1).

Trainable parameters per module: r·(in + out + 1). The frozen start (U_p⁰, S_p⁰, V_p⁰ᵀ) is a persistent buffer saved
with the adapter. PEFT has no SORSA: the folder says `peft_type: null`, `splice_method: "sorsa"`. Wraps nn.Linear
and HF Conv1D.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.registry import register
from splice.adapters.svd_common import Factored, check_kind, check_rank, dtype_of, positive_int, svd, weight_matrix
from splice.errors import SpliceError


@dataclass
class SorsaConfig(AdapterConfig):
    """SORSA hyper-parameters; names follow the authors' code (rank → r, gamma)."""

    r: int = doc("Rank of the trained principal part U_p diag(S_p) V_pᵀ (its top-r singular triplets).", default=8)
    gamma: float = doc("Weight γ of the orthonormal regulariser ‖U_pᵀU_p − I‖²_F + ‖V_pᵀV_p − I‖²_F "
                       "(mean over modules), added to the training loss.", default=4e-4)

    params_formula: ClassVar[str] = "r·(in + out + 1) (U_p, S_p and V_p)"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self.r, "r")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or self.gamma < 0:
            raise SpliceError(f"gamma: must be a number ≥ 0, got {self.gamma!r}")

    def training_hook(self, model: nn.Module, adapter_name: str, total_steps: int) -> "OrthonormalRegulariser":
        """What the training loop adds for this method: the orthonormal regulariser."""
        return OrthonormalRegulariser(model, adapter_name, self.gamma)


@register("sorsa", config=SorsaConfig, reference="https://arxiv.org/abs/2409.00055")
class SorsaAdapter(Factored):
    """One SORSA adapter: the trained principal part (B = U_p, S = S_p, A = V_pᵀ) and its frozen start."""

    peft_keys: ClassVar[tuple[str, ...]] = ("sorsa_A", "sorsa_S", "sorsa_B", "sorsa_A0", "sorsa_S0", "sorsa_B0")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: SorsaConfig) -> dict[str, tuple[int, ...]]:
        in_f, out_f = check_kind("sorsa", base, kind)
        r = config.r
        return {"sorsa_A": (r, in_f), "sorsa_S": (r,), "sorsa_B": (out_f, r),
                "sorsa_A0": (r, in_f), "sorsa_S0": (r,), "sorsa_B0": (out_f, r)}

    def __init__(self, base: nn.Module, kind: str, config: SorsaConfig):
        super().__init__()
        in_f, out_f = check_kind("sorsa", base, kind)
        check_rank(config.r, in_f, out_f)
        self.kind = kind
        U, S, Vh = svd(weight_matrix(base, kind))
        r, dt = config.r, dtype_of(base)
        A, S, B = Vh[:r].to(dt).contiguous(), S[:r].to(dt).contiguous(), U[:, :r].to(dt).contiguous()
        self.sorsa_A = nn.Parameter(A.clone())  # V_pᵀ (r, in)
        self.sorsa_S = nn.Parameter(S.clone())  # S_p (r,)
        self.sorsa_B = nn.Parameter(B.clone())  # U_p (out, r)
        self.register_buffer("sorsa_A0", A)
        self.register_buffer("sorsa_S0", S)
        self.register_buffer("sorsa_B0", B)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        # Two identical computations, the trained one minus the start: exactly 0 while they are equal.
        x = x.to(self.sorsa_A.dtype)
        now = ((x @ self.sorsa_A.t()) * self.sorsa_S) @ self.sorsa_B.t()
        start = ((x @ self.sorsa_A0.t()) * self.sorsa_S0) @ self.sorsa_B0.t()
        return (now - start).to(base_out.dtype)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(out, 2r) and (2r, in): the trained principal part minus its frozen start."""
        B = torch.cat([self.sorsa_B * self.sorsa_S, -(self.sorsa_B0 * self.sorsa_S0)], 1)
        return B, torch.cat([self.sorsa_A, self.sorsa_A0], 0)

    def orthonormality(self) -> Tensor:
        """‖U_pᵀU_p − I‖²_F + ‖V_pᵀV_p − I‖²_F (0 at the start: singular vectors are orthonormal)."""
        eye = torch.eye(self.sorsa_A.shape[0], device=self.sorsa_A.device, dtype=self.sorsa_A.dtype)
        return ((self.sorsa_B.t() @ self.sorsa_B - eye).square().sum()
                + (self.sorsa_A @ self.sorsa_A.t() - eye).square().sum())


class OrthonormalRegulariser:
    """SORSA's regulariser over every SORSA module of one adapter, as a training-loop hook (`loss()`)."""

    def __init__(self, model: nn.Module, adapter_name: str, gamma: float):
        from splice.adapters.inject import adapter_layers

        self.gamma = float(gamma)
        named = [layer.adapters[adapter_name] for _, layer in adapter_layers(model) if adapter_name in layer.adapters]
        self.adapters = [a for a in named if isinstance(a, SorsaAdapter)]
        if not self.adapters:
            raise SpliceError(f"adapter {adapter_name!r} has no SORSA module")

    def loss(self) -> Tensor:
        """γ · mean over modules of the orthonormality terms."""
        return self.gamma * torch.stack([a.orthonormality() for a in self.adapters]).mean()
