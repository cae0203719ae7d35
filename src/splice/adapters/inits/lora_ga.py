"""LoRA-GA: low-rank adaptation with gradient approximation (Wang et al. 2024, https://arxiv.org/abs/2407.05000).

    G = mean over calibration batches of ∂loss/∂W   (out × in, the full fine-tune's first gradient)
    G = U S Vᵀ;  direction "ArB2r":  A₀ = V[:, :r]ᵀ,   B₀ = U[:, r:2r] · diag(S[r:2r]) · γ

so that the first step of LoRA (which moves W by s(dB A₀ + B₀ dA) with dB ∝ G A₀ᵀ, dA ∝ B₀ᵀ G) follows the top
singular directions of the full gradient. Other directions split the first 2r components differently (ArBr:
A the odd ones, B the even ones; A2rBr: A the second r, B the first r; random). The scale γ: "stable"
out^¼ / √stable_gamma on B only, B = U·S_B, as PEFT 0.21 does it (the paper and its authors' code scale both A
and B by out^¼/√γ and take the bare singular vectors; splice keeps PEFT's start so that the two agree), "weight_svd" σ₁(W) / S_B[0], "gd_scale" A and B divided by s, "unit" 1.
The layer starts at s B₀ A₀ ≠ 0, which it subtracts (see splice.adapters.inits), so the model starts as the base.

As in PEFT the gradient is taken in train mode. splice's SVD is exact (PEFT uses torch.svd_lowrank with q = 4r,
exact only when 4r ≥ min(out, in)).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from splice.adapters.config import doc
from splice.errors import SpliceError

DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclass
class LoraGAConfig:
    """LoRA-GA's options; names follow PEFT's `LoraGAConfig`."""

    direction: str = doc("Which of the gradient's first 2r singular components go to A and to B: ArB2r, ArBr, "
                         "A2rBr or random.", default="ArB2r")
    scale: str = doc("Scaling of the start: stable, weight_svd, gd_scale or unit.", default="stable")
    stable_gamma: float = doc("γ of the stable scaling out^¼ / √γ.", default=16)

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise SpliceError(f"lora_ga_config.direction: must be one of {', '.join(DIRECTIONS)}, "
                              f"got {self.direction!r}")
        if self.scale not in SCALES:
            raise SpliceError(f"lora_ga_config.scale: must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if not float(self.stable_gamma) > 0:
            raise SpliceError(f"lora_ga_config.stable_gamma: must be positive, got {self.stable_gamma!r}")


def mean_gradients(model: nn.Module, weights: dict[str, Tensor], batches: Iterable[Any],
                   loss_fn: Callable[[Any], Tensor], who: str = "lora_ga") -> dict[str, Tensor]:
    """Name → mean over `batches` of ∂loss/∂weight (float32), in train mode; other parameters get no gradient.
    `who` names the init in messages."""
    params = dict(weights)
    flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    sums: dict[str, Tensor] = {}
    count = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        model.train()
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(batch)
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    raise SpliceError(f"{who}: each calibration batch must give a scalar loss (include labels, "
                                      "or pass calibration_loss)")
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (n, p), g in zip(params.items(), grads):
                    g = torch.zeros_like(p) if g is None else g
                    sums[n] = sums[n] + g.float() if n in sums else g.float()
                count += 1
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    if not count:
        raise SpliceError(f"calibration: no batches ({who} needs a few batches to estimate the gradient)")
    return {n: s / count for n, s in sums.items()}


def lora_ga_start(grad: Tensor, weight: Tensor, r: int, scaling: float, ga: LoraGAConfig) -> tuple[Tensor, Tensor]:
    """(A₀ (r, in), B₀ (out, r)) from the (out, in) gradient and weight of one layer."""
    if 2 * r > min(grad.shape):
        raise SpliceError(f"r: lora_ga needs 2r ≤ min(out, in) = {min(grad.shape)}, got r = {r}")
    U, S, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    U, S, Vh = U[:, :2 * r], S[:2 * r], Vh[:2 * r]
    if ga.direction == "ArBr":
        a, b = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
    elif ga.direction == "A2rBr":
        a, b = slice(r, 2 * r), slice(0, r)
    elif ga.direction == "ArB2r":
        a, b = slice(0, r), slice(r, 2 * r)
    else:
        a = b = torch.randperm(2 * r)[:r]
    A, B, S_B = Vh[a], U[:, b] * S[b], S[b]
    if ga.scale == "stable":
        B = B * (grad.shape[0] ** 0.25 / float(ga.stable_gamma) ** 0.5)
    elif ga.scale == "weight_svd" and S_B[0] > 0:
        B = B * (torch.linalg.svdvals(weight.float())[0] / S_B[0])
    elif ga.scale == "gd_scale":
        A, B = A / scaling, B / scaling
    return A.contiguous(), B.contiguous()
