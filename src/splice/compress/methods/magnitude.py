"""Magnitude pruning of a delta: keep the k = max(1, ⌊density·n⌋) entries of largest |Δ| (TIES' trim step).

TIES-Merging, Yadav et al. 2023, https://arxiv.org/abs/2306.01708 (Eq. "trim": keep the top-k% magnitudes).
The math is `splice.merge.methods.sparsify.magnitude`, shared with the merge methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from splice.compress.codec import Packed
from splice.compress.methods._parts import check_density, sparsified
from splice.compress.registry import Context, register
from splice.merge.methods.sparsify import magnitude as magnitude_prune


@dataclass(frozen=True)
class MagnitudeConfig:
    density: float = field(default=0.1, metadata={"help": "fraction of entries kept, (0, 1]"})
    rescale: bool = field(default=False, metadata={"help": "scale survivors to keep the L1 norm (as mergekit)"})

    def __post_init__(self) -> None:
        check_density("magnitude", self.density)


@register("magnitude", config=MagnitudeConfig, reference="https://arxiv.org/abs/2306.01708", stages=("sparsify",))
def magnitude(delta: Packed, config: MagnitudeConfig, ctx: Context) -> Packed:
    return sparsified(delta, "magnitude", ctx.name, lambda t: magnitude_prune(t, config.density, config.rescale))
