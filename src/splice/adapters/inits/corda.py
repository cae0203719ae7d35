"""CorDA: context-oriented decomposition adaptation (Yang et al. 2024, https://arxiv.org/abs/2406.05223).

    C = mean over calibration samples of X̂ᵀX̂,   X̂ = a sample's layer inputs (tokens × in) / its largest entry
    W C = U S V̂ᵀ  (SVD),   V = (V̂ᵀ C⁻¹)ᵀ          so that  U S Vᵀ = W  (the weight, decomposed along its context)
    ipm (instruction-previewed):  the top r triplets;   kpm (knowledge-preserved):  the bottom r
    A₀ = √(S_r / s) V_rᵀ,   B₀ = U_r √(S_r / s)

C is damped (C + δ·mean(diag C)·I, δ doubling from 0.01 until C⁻¹ is accurate) so it can be inverted. In IPM the
adapter starts on the components the task's inputs excite most; in KPM on the ones they excite least, leaving the
knowledge the calibration data stands for in the frozen residual. The layer starts at s B₀ A₀, which it subtracts
(see splice.adapters.inits), so the model starts as the base. As in PEFT each sample (each row of a batch) is
normalised on its own; padding (attention_mask 0) is left out.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from splice.adapters.config import doc
from splice.adapters.inits.calibrate import collect, token_mask
from splice.errors import SpliceError


@dataclass
class CordaConfig:
    """CorDA's options; names follow PEFT's `CordaConfig`."""

    corda_method: str = doc("ipm (adapt the components the data excites most) or kpm (the least, preserving what "
                            "the data stands for).", default="ipm")

    def __post_init__(self) -> None:
        if self.corda_method not in ("ipm", "kpm"):
            raise SpliceError(f"corda_config.corda_method: must be ipm or kpm, got {self.corda_method!r}")


def input_covariances(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable[Any],
                      forward: Callable[[Any], Any]) -> dict[str, Tensor]:
    """Name → mean over samples of X̂ᵀX̂ (float32), each sample's inputs divided by their largest entry."""
    sums: dict[str, list[Any]] = {}

    def observe(name: str, x: Tensor, batch: Any) -> None:
        mask = token_mask(batch, use_labels=False)
        samples = x if x.dim() == 3 else x.unsqueeze(0)
        acc = sums.setdefault(name, [0, 0.0])
        for i, sample in enumerate(samples):  # (tokens, in)
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                sample = sample[mask[i]]
            if sample.shape[0] == 0:  # a sample that is all padding has no input to count
                continue
            sample = sample.float()
            sample = sample / sample.max().abs()
            if not torch.isfinite(sample).all():
                raise SpliceError(f"corda: module {name!r} got non-finite or all-zero inputs from a calibration "
                                  "sample")
            acc[0] += 1
            acc[1] = acc[1] + sample.t() @ sample
    collect(model, modules, batches, observe, forward)
    missing = [n for n in modules if n not in sums or sums[n][0] == 0]
    if missing:
        raise SpliceError(f"corda: module {missing[0]!r} saw no calibration input")
    return {n: total / count for n, (count, total) in sums.items()}


def corda_start(weight: Tensor, covariance: Tensor, r: int, scaling: float, corda: CordaConfig
                ) -> tuple[Tensor, Tensor]:
    """(A₀ (r, in), B₀ (out, r)) from a layer's (out, in) weight and its input covariance (in, in)."""
    W, C = weight.float(), covariance.float()
    if r > min(W.shape):
        raise SpliceError(f"r: rank {r} is larger than the layer ({W.shape[1]} → {W.shape[0]}), which corda "
                          "decomposes")
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    damp = 0.01
    while True:  # damp until the inverse is accurate (PEFT's rule and thresholds)
        fixed = C + eye * C.diagonal().mean() * damp
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(W @ fixed, full_matrices=False)
    V = (Vh @ inverse).t()  # (in, k): U S Vᵀ = W
    part = slice(0, r) if corda.corda_method == "ipm" else slice(S.shape[0] - r, S.shape[0])
    U, S, V = U[:, part], S[part] / scaling, V[:, part]
    root = S.sqrt()
    return (V.t() * root[:, None]).contiguous(), (U * root).contiguous()
