"""Delta-CoMe: mixed-precision delta compression by singular value. Ping et al. 2024,
https://arxiv.org/abs/2406.08903

Deltas have long-tailed singular values, so the singular vectors of the largest singular values get more bits:

    ΔW = Σ_i s_i u_i v_iᵀ ≈ Σ_blocks Q_{b_k}(U_k √S_k) · Q_{b_k}(√S_k V_kᵀ),   b_0 > b_1 > … (bits per block)

Block k holds the next ``block_ranks[k]`` singular vectors (the last block all the rest, up to ``rank`` / ``energy``),
each factor quantized at ``block_bits[k]`` bits in groups of ``group_size`` over the block's flattened factor (one
singular vector after another, so a group spans two vectors where a layer's width is not a multiple). The paper
quantizes with GPTQ on calibration data; this data-free version rounds to nearest (`splice.compress.codec`). The
default split (8 bits for 2 vectors, 4 bits for the next 30, 2 bits for the rest) is ours, not the paper's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from splice.compress.codec import CTensor, Packed
from splice.compress.methods.quantize import quantize_part
from splice.compress.methods.svd import check_rank_energy, factorize, lowrank_packed
from splice.compress.registry import Context, register
from splice.errors import SpliceError


def _ints(text: str | list | tuple, what: str) -> list[int]:
    try:
        items = text.split(",") if isinstance(text, str) else list(text)
        return [int(x) for x in items]
    except (TypeError, ValueError):
        raise SpliceError(f"delta_come: {what} must be comma-separated integers, got {text!r}") from None


@dataclass(frozen=True)
class DeltaComeConfig:
    rank: int | None = field(default=None, metadata={"help": "singular vectors kept (default: all)"})
    energy: float | None = field(default=None, metadata={"help": "or: the share of ||dW||^2 kept"})
    block_bits: str = field(default="8,4,2", metadata={"help": "bits per block, decreasing"})
    block_ranks: str = field(default="2,30", metadata={"help": "singular vectors in each block but the last"})
    group_size: int = field(default=128, metadata={"help": "values per scale along a singular vector"})

    def __post_init__(self) -> None:
        check_rank_energy("delta_come", self.rank, self.energy, required=False)
        bits, ranks = _ints(self.block_bits, "block_bits"), _ints(self.block_ranks, "block_ranks")
        if len(ranks) != len(bits) - 1 or any(r < 1 for r in ranks):
            raise SpliceError(f"delta_come: block_ranks needs {len(bits) - 1} positive numbers for {len(bits)} bit "
                              f"widths, got {self.block_ranks!r}")
        if any(not 1 <= b <= 8 for b in bits):
            raise SpliceError(f"delta_come: block_bits must be in 1..8, got {self.block_bits!r}")


@register("delta_come", config=DeltaComeConfig, reference="https://arxiv.org/abs/2406.08903",
          stages=("lowrank", "quantize"))
def delta_come(delta: Packed, config: DeltaComeConfig, ctx: Context) -> Packed:
    bits, ranks = _ints(config.block_bits, "block_bits"), _ints(config.block_ranks, "block_ranks")
    f = factorize(delta, config.rank, config.energy, ctx.name, must_shrink=False) if len(delta.shape) >= 2 else None
    if f is None:  # a bias or norm (or a matrix too small to factor): plain quantization at the top width
        return Packed(delta.kind, {k: quantize_part(p, bits[0], config.group_size, ctx.name)
                                   for k, p in delta.parts.items()}, delta.shape, delta.scale)
    B, A = f
    if B.shape[1] == 0:  # an unchanged matrix (energy picks rank 0): a rank-0 delta, as svd stores it
        return lowrank_packed([(B, A)], delta.shape)
    parts, start = {}, 0
    for k, b in enumerate(bits):
        stop = B.shape[1] if k == len(bits) - 1 else min(start + ranks[k], B.shape[1])
        if stop <= start:
            break
        bt, a = B[:, start:stop].t().contiguous(), A[start:stop].contiguous()
        i = len(parts) // 2
        parts[f"Bt.{i}"] = quantize_part(CTensor(bt.shape, bt.reshape(-1)), b, config.group_size, ctx.name)
        parts[f"A.{i}"] = quantize_part(CTensor(a.shape, a.reshape(-1)), b, config.group_size, ctx.name)
        start = stop
    return Packed("lowrank", parts, delta.shape, 1.0)
