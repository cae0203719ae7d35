"""LoRA initialisations beyond random, one file each; `lora.py` dispatches on `init_lora_weights`.

A *start* is a pair (A₀, B₀) with s B₀ A₀ ≠ 0. The layer keeps the base weight untouched and subtracts the frozen
s B₀ A₀ itself, so the adapted model equals the base at initialisation and the update against the original base
is s (B A − B₀ A₀), exact and of rank 2r (what PEFT writes when it converts such an adapter for sharing).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from splice.adapters.inits.olora import olora_start
from splice.adapters.inits.pissa import pissa_start

# init name → (W (out, in) float32, r, scale) → (A₀ (r, in), B₀ (out, r)): the inits that need only the weight.
WEIGHT_STARTS: dict[str, Callable[[Tensor, int, float], tuple[Tensor, Tensor]]] = {
    "pissa": pissa_start,
    "olora": olora_start,
}
