"""DAREx-q: DARE with the rescaling 1/q instead of 1/(1 − p). Deng et al. 2025, https://arxiv.org/abs/2410.09344

    Δ̃ = (m ⊙ Δ) / q,   m_i ~ Bernoulli(1 − p),   q ∈ [1 − p, 1]

At high drop rates DARE's factor 1/(1 − p) inflates the variance of each layer's output change; DAREx picks q to
keep that change small. q is fixed (``q``) or chosen per tensor without data (``q_mode``: "output", the q that
minimises the expected output change for a constant input; "norm", the q that keeps ‖Δ̃‖ = ‖Δ‖). The math is
`splice.merge.methods.darex` (shared with the ``darex`` merge method, whose docstring derives q*).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from splice.compress.codec import Packed
from splice.compress.methods._parts import check_density, sparsified
from splice.compress.registry import Context, register
from splice.errors import SpliceError, closest
from splice.merge.methods.darex import Q_MODES, darex_drop


@dataclass(frozen=True)
class DarexConfig:
    density: float = field(default=0.1, metadata={"help": "keep probability 1 - p, (0, 1]"})
    q: float | None = field(default=None, metadata={"help": "fixed q in [density, 1]; default: per tensor"})
    q_mode: str = field(default="output", metadata={"help": "data-free choice of q: output, norm or dare"})

    def __post_init__(self) -> None:
        check_density("darex", self.density)
        if self.q_mode not in Q_MODES:
            raise SpliceError(f"darex: q_mode {self.q_mode!r} is not one of {', '.join(Q_MODES)}"
                              f"{closest(self.q_mode, Q_MODES)}")
        if self.q is not None and not self.density <= self.q <= 1.0:
            raise SpliceError(f"darex: q must be in [density, 1] = [{self.density}, 1], got {self.q}")


@register("darex", config=DarexConfig, reference="https://arxiv.org/abs/2410.09344", stages=("sparsify",))
def darex(delta: Packed, config: DarexConfig, ctx: Context) -> Packed:
    return sparsified(delta, "darex", ctx.name, lambda t: darex_drop(t, config.density, ctx.generator, q=config.q,
                                                                    q_mode=config.q_mode))
