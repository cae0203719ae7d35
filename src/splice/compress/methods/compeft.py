"""ComPEFT: sparsify, then keep only the sign, with one scale per tensor. Yadav et al. 2023,
https://arxiv.org/abs/2311.13171

    Δ̃ = α · sign(topk(Δ, k))          (ternary: each entry is −α, 0 or +α)

``topk`` keeps the k = int(density·n) largest magnitudes (computed in floating point, as mergekit does, so 0.29·100
keeps 28) (the TIES trim, `splice.merge.methods.sparsify.magnitude`).
The paper sets α = c·σ(Δ) with c tuned on validation data; with no data, the default here is the α that minimises
‖Δ_kept − α·sign(Δ_kept)‖₂, the mean |kept value| (``alpha: mean``); a number c gives the paper's α = c·std(Δ).
Stored as the positions (bitmask or int32), one sign bit per kept entry and one float32 scale per tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.compress.codec import CTensor, Packed, QTensor, quantize as quantize_values
from splice.compress.methods._parts import check_density, map_parts
from splice.compress.registry import Context, register
from splice.errors import SpliceError
from splice.merge.methods.sparsify import magnitude as magnitude_prune


@dataclass(frozen=True)
class CompeftConfig:
    density: float = field(default=0.1, metadata={"help": "fraction of entries kept, (0, 1]"})
    alpha: str | float = field(default="mean", metadata={"help": "'mean' (mean |kept|) or c for alpha = c*std"})

    def __post_init__(self) -> None:
        check_density("compeft", self.density)
        if self.alpha != "mean":
            try:
                c = float(self.alpha)
            except (TypeError, ValueError):
                raise SpliceError(f"compeft: alpha must be 'mean' or a positive number, got {self.alpha!r}") from None
            if c <= 0:
                raise SpliceError(f"compeft: alpha must be positive, got {c}")


@register("compeft", config=CompeftConfig, reference="https://arxiv.org/abs/2311.13171",
          stages=("sparsify", "quantize"))
def compeft(delta: Packed, config: CompeftConfig, ctx: Context) -> Packed:
    def one(_: str, part: CTensor) -> CTensor:
        if part.quantized:
            raise SpliceError(f"tensor {ctx.name!r}: compeft cannot act on quantized values")
        dense = part.decode().float()
        kept = CTensor.sparse_from_dense(magnitude_prune(dense, config.density))
        q = quantize_values(kept.values, bits=1, group_size=0)  # sign bits, scale = mean |kept|
        if config.alpha != "mean" and dense.numel() > 1:  # a one-entry tensor has no std: keep mean |kept|
            q = QTensor(q.codes, torch.tensor([float(config.alpha) * float(dense.std())]), 1, 0, q.numel)
        return CTensor(kept.shape, q, kept.index)
    return map_parts(delta, one)
