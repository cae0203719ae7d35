"""OLoRA: orthonormal low-rank adaptation (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775).

    W₀ = Q R  (thin QR),   B₀ = Q[:, :r]  (orthonormal columns),   A₀ = R[:r]  (upper triangular)

The adapter starts on the first r directions of the base weight's orthonormal basis and trains on the residual
W₀ − s B₀ A₀, so the adapted model equals the base at initialisation. As in PEFT, the factors are not divided by
the scaling s: the residual carries it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def olora_start(W: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor]:
    """(A₀ (r, in), B₀ (out, r)) from the (out, in) base weight `W` (float32); `scale` does not enter."""
    Q, R = torch.linalg.qr(W)  # Q (out, k), R (k, in), k = min(out, in)
    return R[:r].contiguous(), Q[:, :r].contiguous()
