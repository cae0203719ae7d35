"""DARE: Drop And REscale. Yu et al. 2023, "Language Models are Super Mario", https://arxiv.org/abs/2311.03099

Each delta entry is kept with probability 1 − p (= density) and the survivors are rescaled by 1/(1 − p) (Eq. 2):

    m_i ~ Bernoulli(1 − p),   Δ̃ = (m ⊙ Δ) / (1 − p),   so E[Δ̃] = Δ.

The draw is `splice.merge.methods.darex.darex_drop` with ``q_mode="dare"`` (q = 1 − p), shared with the merge
methods; the generator is seeded per tensor name, so a run is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from splice.compress.codec import Packed
from splice.compress.methods._parts import check_density, sparsified
from splice.compress.registry import Context, register
from splice.merge.methods.darex import darex_drop


@dataclass(frozen=True)
class DareConfig:
    density: float = field(default=0.1, metadata={"help": "keep probability 1 - p, (0, 1]"})

    def __post_init__(self) -> None:
        check_density("dare", self.density)


@register("dare", config=DareConfig, reference="https://arxiv.org/abs/2311.03099", stages=("sparsify",))
def dare(delta: Packed, config: DareConfig, ctx: Context) -> Packed:
    return sparsified(delta, "dare", ctx.name,
                      lambda t: darex_drop(t, config.density, ctx.generator, q_mode="dare"))
