"""Low-bit quantization of a delta's stored values: int8 / int4 / ... / 1-bit sign + scale, per tensor or group.

Symmetric round-to-nearest (b ≥ 2 bits) and sign + scale (1 bit), as in `splice.compress.codec.quantize`:

    b ≥ 2:  x̂ = s·round(x/s),  s = max|x| / (2^(b−1) − 1) per group   →   |x − x̂| ≤ s/2
    b = 1:  x̂ = s·sign(x),     s = mean|x| per group (the s minimising ‖x − x̂‖₂)

Li et al., "Parameter-efficient is not sufficient... / 1-bit adapters" (precision redundancy of adapters),
https://arxiv.org/abs/2307.00788; BitDelta (sign + per-tensor scale of a full fine-tune delta),
https://arxiv.org/abs/2402.10193. Acts on whatever values a delta stores: a dense tensor, the kept values of a
sparse one, or both factors of a low-rank one (a LoRA's B and A; ERE's "quantized factors").
"""
from __future__ import annotations

from dataclasses import dataclass, field

from splice.compress.codec import CTensor, Packed, quantize as quantize_values
from splice.compress.methods._parts import map_parts
from splice.compress.registry import Context, register
from splice.errors import SpliceError


@dataclass(frozen=True)
class QuantizeConfig:
    bits: int = field(default=4, metadata={"help": "bits per value: 8, 4, 2 (ternary), 1 (sign + scale), 1..8"})
    group_size: int = field(default=128, metadata={"help": "values per scale; 0 = one scale per tensor"})

    def __post_init__(self) -> None:
        if not 1 <= int(self.bits) <= 8:
            raise SpliceError(f"quantize: bits must be in 1..8, got {self.bits}")
        if int(self.group_size) < 0:
            raise SpliceError(f"quantize: group_size must be >= 0 (0: per tensor), got {self.group_size}")


def quantize_part(part: CTensor, bits: int, group_size: int, name: str) -> CTensor:
    if part.quantized:
        raise SpliceError(f"tensor {name!r}: already quantized")
    return CTensor(part.shape, quantize_values(part.values, int(bits), int(group_size)), part.index)


@register("quantize", config=QuantizeConfig, reference="https://arxiv.org/abs/2307.00788", stages=("quantize",))
def quantize(delta: Packed, config: QuantizeConfig, ctx: Context) -> Packed:
    return map_parts(delta, lambda _, p: quantize_part(p, config.bits, config.group_size, ctx.name))
