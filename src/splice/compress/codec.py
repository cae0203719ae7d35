"""How a compressed delta is held: packed low-bit codes, sparse positions, and the `Packed` delta form.

Three layers, each a small frozen dataclass:

- `QTensor`: n values quantized to ``bits`` each, in groups of ``group_size`` (0: one group), one float32 scale
  per group. ``bits = 1`` is sign + scale, ``x̂ = ±s`` with ``s = mean|x|`` of the group (the L2-optimal scale
  for a sign code); ``bits = b ≥ 2`` is symmetric round-to-nearest, ``x̂ = s·q`` with
  ``q ∈ {−(2^(b−1)−1), …, 2^(b−1)−1}`` and ``s = max|x| / (2^(b−1)−1)``, so ``|x − x̂| ≤ s/2`` for every entry
  (``b = 2`` is ternary). Codes are stored as ``b`` packed bit-planes: ``b·⌈n/8⌉`` bytes.
- `CTensor`: one tensor of a delta, dense or sparse (sorted flat positions of the kept entries), its values either
  a plain tensor or a `QTensor`. On disk the positions are a bitmask (n/8 bytes) or int32 offsets, whichever is
  smaller; `nbytes` counts exactly what is written.
- `Packed`: a `Delta` (see `splice.delta.forms`) made of `CTensor` parts: ``kind="dense"`` has one part ``w``;
  ``kind="lowrank"`` has blocks ``Bt.i`` (rᵢ, out) and ``A.i`` (rᵢ, in) with ``ΔW = scale·[Bt.0; Bt.1; …]ᵀ·[A.0;
  A.1; …]`` (each block may carry its own bit width: Delta-CoMe). It decodes to `Dense`, `Sparse` or `LowRank`
  and applies through them, so everything that takes a Delta takes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from splice.delta.forms import Delta, Dense, LowRank, Scale, Sparse
from splice.errors import SpliceError

__all__ = ["QTensor", "CTensor", "Packed", "pack", "quantize", "index_nbytes"]

_PLANE_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _pack_bits(bits: Tensor) -> Tensor:
    """(n,) bool → (⌈n/8⌉,) uint8, little-endian within a byte."""
    n = bits.numel()
    padded = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.uint8)
    padded[:n] = bits.to(torch.uint8)
    return (padded.view(-1, 8) * _PLANE_WEIGHTS).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, n: int) -> Tensor:
    """(⌈n/8⌉,) uint8 → (n,) bool."""
    return (packed.view(-1, 1) & _PLANE_WEIGHTS).ne(0).view(-1)[:n]


def n_scales(numel: int, group_size: int) -> int:
    """Scales of `numel` values in groups of `group_size` (0: one group); an empty tensor keeps one."""
    return 1 if group_size == 0 or numel == 0 else math.ceil(numel / group_size)


@dataclass(frozen=True, eq=False)
class QTensor:
    """`numel` values as packed `bits`-bit codes (bits, ⌈numel/8⌉) uint8 plus one float32 scale per group."""

    codes: Tensor
    scales: Tensor
    bits: int
    group_size: int  # 0: one group for the whole tensor
    numel: int

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise SpliceError(f"quantize: bits must be in 1..8, got {self.bits}")
        want = (self.bits, math.ceil(self.numel / 8))
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != want:
            raise SpliceError(f"QTensor: codes must be uint8 of shape {want}, got {self.codes.dtype} "
                              f"{tuple(self.codes.shape)}")
        if tuple(self.scales.shape) != (n_scales(self.numel, self.group_size),):
            raise SpliceError(f"QTensor: {n_scales(self.numel, self.group_size)} scales expected, got "
                              f"{tuple(self.scales.shape)}")

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * self.scales.element_size()

    def _groups(self) -> int:  # the group length: a group longer than the tensor is the tensor (no huge padding)
        return min(self.group_size, max(self.numel, 1)) if self.group_size else max(self.numel, 1)

    def dequantize(self) -> Tensor:
        """The (numel,) float32 values."""
        q = torch.zeros(self.numel, dtype=torch.int32)
        for j in range(self.bits):
            q |= _unpack_bits(self.codes[j], self.numel).to(torch.int32) << j
        scale = self.scales.float().repeat_interleave(self._groups())[: self.numel]
        if self.bits == 1:
            return (q * 2 - 1).float() * scale
        qmax = 2 ** (self.bits - 1) - 1
        return (q - qmax).float() * scale


def quantize(x: Tensor, bits: int, group_size: int = 0) -> QTensor:
    """Quantize the values of `x` (any shape, read flat) to `bits` bits per value, in groups of `group_size`."""
    if not 1 <= bits <= 8:
        raise SpliceError(f"quantize: bits must be in 1..8, got {bits}")
    if group_size < 0:
        raise SpliceError(f"quantize: group_size must be >= 0 (0: one group per tensor), got {group_size}")
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    g = min(group_size, max(n, 1)) if group_size else max(n, 1)  # a group longer than x is all of x
    groups = math.ceil(n / g) if n else 1
    padded = torch.zeros(groups * g)
    padded[:n] = flat
    rows = padded.view(groups, g)  # (G, g)
    counts = torch.full((groups,), float(g))
    if n % g:
        counts[-1] = n % g
    if bits == 1:
        scales = rows.abs().sum(1) / counts  # mean |x| (padding adds 0 to the sum, not to the count)
        q = (rows >= 0).to(torch.int32)
    else:
        qmax = 2 ** (bits - 1) - 1
        scales = rows.abs().amax(1) / qmax
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(rows / safe[:, None]).clamp_(-qmax, qmax).to(torch.int32) + qmax
    q = q.reshape(-1)[:n]
    codes = torch.stack([_pack_bits((q >> j) & 1) for j in range(bits)]) if n else torch.zeros(bits, 0, dtype=torch.uint8)
    return QTensor(codes, scales.float(), bits, group_size, n)


def index_nbytes(nnz: int, numel: int) -> tuple[str, int]:
    """How a sparse part's positions are stored, and their bytes: a bitmask or int32 offsets, the smaller."""
    mask = math.ceil(numel / 8)
    if numel < 2**31 and 4 * nnz < mask:
        return "int32", 4 * nnz
    return "mask", mask


@dataclass(frozen=True, eq=False)
class CTensor:
    """One tensor of shape `shape`: all entries (`index` None) or those at the sorted flat positions `index`."""

    shape: torch.Size
    values: Tensor | QTensor
    index: Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(int(s) for s in self.shape))
        n = self.values.numel if isinstance(self.values, QTensor) else self.values.numel()
        want = math.prod(self.shape) if self.index is None else self.index.numel()
        if n != want:
            raise SpliceError(f"CTensor: {n} values for {want} entries of shape {tuple(self.shape)}")

    @property
    def quantized(self) -> bool:
        return isinstance(self.values, QTensor)

    @property
    def nnz(self) -> int:
        return math.prod(self.shape) if self.index is None else self.index.numel()

    @property
    def nbytes(self) -> int:
        v = self.values.nbytes if isinstance(self.values, QTensor) else self.values.numel() * self.values.element_size()
        return v + (0 if self.index is None else index_nbytes(self.index.numel(), math.prod(self.shape))[1])

    def plain_values(self) -> Tensor:
        """The stored values as a float tensor (dequantized when quantized), (nnz,)."""
        return self.values.dequantize() if isinstance(self.values, QTensor) else self.values.reshape(-1)

    def decode(self) -> Tensor:
        """The dense tensor."""
        vals = self.plain_values()
        if self.index is None:
            return vals.reshape(self.shape)
        out = torch.zeros(math.prod(self.shape), dtype=vals.dtype)
        return out.index_copy_(0, self.index, vals).view(self.shape)

    @staticmethod
    def sparse_from_dense(t: Tensor) -> CTensor:
        """Keep the nonzero entries of `t` (positions sorted)."""
        flat = t.reshape(-1)
        index = flat.nonzero().view(-1)
        return CTensor(t.shape, flat[index].clone(), index)


@dataclass(frozen=True, eq=False)
class Packed:
    """A delta stored as `CTensor` parts (see the module docstring); decodes to Dense / Sparse / LowRank."""

    kind: str  # "dense" | "lowrank"
    parts: dict[str, CTensor]
    shape: torch.Size
    scale: float = 1.0
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(int(s) for s in self.shape))
        if self.kind == "dense":
            if set(self.parts) != {"w"} or self.parts["w"].shape != self.shape:
                raise SpliceError(f"Packed dense delta needs one part 'w' of shape {tuple(self.shape)}")
        elif self.kind == "lowrank":
            blocks = self.blocks
            if not blocks or len(self.parts) != 2 * len(blocks):
                raise SpliceError(f"Packed low-rank delta needs parts Bt.i and A.i, got {sorted(self.parts)}")
            out, inn = self.shape[0], math.prod(self.shape[1:])
            for i in range(len(blocks)):
                bt, a = self.parts[f"Bt.{i}"], self.parts[f"A.{i}"]
                if len(bt.shape) != 2 or len(a.shape) != 2 or bt.shape[0] != a.shape[0] or bt.shape[1] != out \
                        or a.shape[1] != inn:
                    raise SpliceError(f"Packed low-rank block {i}: Bt {tuple(bt.shape)} and A {tuple(a.shape)} do "
                                      f"not make a delta of shape {tuple(self.shape)}")
        else:
            raise SpliceError(f"Packed: kind must be 'dense' or 'lowrank', got {self.kind!r}")
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def blocks(self) -> list[int]:
        return sorted(int(k.split(".")[1]) for k in self.parts if k.startswith("A."))

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    @property
    def numel_stored(self) -> int:
        return sum(p.nnz for p in self.parts.values())

    @property
    def rank(self) -> int:
        return sum(self.parts[f"A.{i}"].shape[0] for i in self.blocks) if self.kind == "lowrank" else 0

    def unpacked(self) -> Dense | Sparse | LowRank:
        """The decoded form (cached: a delta is often applied once and measured once)."""
        if "form" not in self._cache:
            if self.kind == "lowrank":
                bt = torch.cat([self.parts[f"Bt.{i}"].decode() for i in self.blocks])
                a = torch.cat([self.parts[f"A.{i}"].decode() for i in self.blocks])
                form: Dense | Sparse | LowRank = LowRank(bt.t().contiguous(), a, self.scale, self.shape)
            else:
                w = self.parts["w"]
                form = Dense(w.decode()) if w.index is None else Sparse(w.index, w.plain_values(), self.shape)
            self._cache["form"] = form
        return self._cache["form"]

    def materialize(self, base: Tensor | None = None) -> Tensor:
        return self.unpacked().materialize(base)

    def apply_to(self, weight: Tensor, scale: float = 1.0) -> Tensor:
        return self.unpacked().apply_to(weight, scale)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Delta:
        """The decoded form, cast/moved (a packed form is a storage format, not a compute one)."""
        return self.unpacked().to(dtype=dtype, device=device)


def pack(delta: Delta, name: str = "") -> Packed:
    """Any additive delta as a `Packed` form with plain (unquantized) parts; a Packed one is returned as is.

    Raises:
        SpliceError: a multiplicative `Scale` delta (IA3), which has no additive form without its base.
    """
    if isinstance(delta, Packed):
        return delta
    if isinstance(delta, Dense):
        t = delta.tensor.detach()
        return Packed("dense", {"w": CTensor(t.shape, t.float().reshape(-1))}, t.shape)
    if isinstance(delta, Sparse):
        # Coalesce repeated positions (Sparse allows them; a sorted unique index is what is stored).
        index, inverse = torch.unique(delta.index, sorted=True, return_inverse=True)
        values = torch.zeros(index.numel(), dtype=torch.float32).index_add_(0, inverse, delta.values.float())
        return Packed("dense", {"w": CTensor(delta.shape, values, index)}, delta.shape)
    if isinstance(delta, LowRank):
        B, A = delta.B.detach().float(), delta.A.detach().float()
        return Packed("lowrank", {"Bt.0": CTensor(B.t().shape, B.t().contiguous().reshape(-1)),
                                  "A.0": CTensor(A.shape, A.contiguous().reshape(-1))}, delta.shape, delta.scale)
    if isinstance(delta, Scale):
        raise SpliceError(f"tensor {name!r}: a multiplicative (IA3-style) Scale delta cannot be compressed; "
                          f"materialize it against its base first (Dense(delta.materialize(base)))")
    raise SpliceError(f"tensor {name!r}: cannot compress a delta of type {type(delta).__name__}")
