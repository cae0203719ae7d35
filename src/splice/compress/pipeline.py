"""Run a chain of compression methods over a Delta or a DeltaSet, tensor by tensor, and measure what it did.

A lazy DeltaSet (the difference of two checkpoints) is read one tensor at a time; only the compressed forms are
kept, so memory is the compressed model plus one dense tensor.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from splice.compress.codec import Packed, pack
from splice.compress.registry import Context, parse_methods
from splice.delta.deltaset import DeltaSet
from splice.delta.forms import Delta, Dense, LowRank, Sparse
from splice.errors import SpliceError

__all__ = ["TensorReport", "CompressReport", "compress", "describe", "relative_error"]


def describe(delta: Delta) -> str:
    """A short description of a delta's form: 'dense', 'lowrank r8', 'sparse 10.0%', 'int4 sparse 5.0%', ..."""
    if isinstance(delta, Dense):
        return "dense"
    if isinstance(delta, LowRank):
        return f"lowrank r{delta.rank}"
    if isinstance(delta, Sparse):
        return f"sparse {100 * delta.index.numel() / max(math.prod(delta.shape), 1):.1f}%"
    if isinstance(delta, Packed):
        bits = sorted({p.values.bits for p in delta.parts.values() if p.quantized}, reverse=True)
        q = f"{'/'.join(map(str, bits))}-bit " if bits else ""
        if delta.kind == "lowrank":
            sparse = any(p.index is not None for p in delta.parts.values())
            return f"{q}lowrank r{delta.rank}{' sparse' if sparse else ''}"
        w = delta.parts["w"]
        if w.index is None:
            return f"{q}dense".strip()
        return f"{q}sparse {100 * w.nnz / max(math.prod(delta.shape), 1):.1f}%"
    return type(delta).__name__


def relative_error(before: torch.Tensor, after: torch.Tensor) -> float:
    """‖before − after‖_F / ‖before‖_F (0 when both are zero, inf when only `before` is)."""
    b, a = before.double(), after.double().reshape(before.shape)
    num, den = float((b - a).norm()), float(b.norm())
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


@dataclass
class TensorReport:
    name: str
    form_before: str
    form_after: str
    bytes_before: int
    bytes_after: int
    rel_error: float


@dataclass
class CompressReport:
    """Bytes before/after and per-tensor relative error ‖ΔW − ΔW̃‖_F / ‖ΔW‖_F of one run."""

    methods: str
    tensors: list[TensorReport] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(t.bytes_before for t in self.tensors)

    @property
    def bytes_after(self) -> int:
        return sum(t.bytes_after for t in self.tensors)

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)

    @property
    def mean_error(self) -> float:
        """The per-tensor relative errors averaged with weights proportional to each tensor's bytes before."""
        w = [t.bytes_before for t in self.tensors]
        return sum(t.rel_error * b for t, b in zip(self.tensors, w)) / max(sum(w), 1)

    def format(self, max_rows: int | None = None) -> str:
        """The report as aligned text: one row per tensor, then the totals."""
        rows = self.tensors if max_rows is None else sorted(self.tensors, key=lambda t: -t.rel_error)[:max_rows]
        width = max([len(t.name) for t in rows] + [6])
        lines = [f"{'tensor':<{width}}  {'before':<12} {'after':<22} {'bytes before':>13} {'bytes after':>12} "
                 f"{'ratio':>7} {'rel. error':>10}"]
        for t in rows:
            lines.append(f"{t.name:<{width}}  {t.form_before:<12} {t.form_after:<22} {t.bytes_before:>13,} "
                         f"{t.bytes_after:>12,} {t.bytes_before / max(t.bytes_after, 1):>6.1f}x {t.rel_error:>10.4f}")
        if max_rows is not None and len(self.tensors) > max_rows:
            lines.append(f"({len(self.tensors) - max_rows} more tensors with smaller errors not shown)")
        worst = max(self.tensors, key=lambda t: t.rel_error, default=None)
        lines.append(f"{self.methods}: {len(self.tensors)} tensors, {self.bytes_before:,} → {self.bytes_after:,} "
                     f"bytes ({self.ratio:.1f}x smaller); relative error mean {self.mean_error:.4f} (size-weighted)"
                     + (f", max {worst.rel_error:.4f} ({worst.name})" if worst else ""))
        return "\n".join(lines)


def _one(delta: Delta, chain: list, name: str, seed: int) -> Packed:
    from splice.merge.executor import tensor_generator  # per-name seeding: the same mask whatever the order

    out = pack(delta, name)
    for method, config in chain:
        out = method.fn(out, config, Context(name, tensor_generator(seed, name)))
    return out


def _check_lowrank_applied(chain: list, report: CompressReport, params: dict[str, Any]) -> None:
    if any("lowrank" in m.stages for m, _ in chain) and params.get("rank") is not None and report.tensors \
            and not any("lowrank" in t.form_after for t in report.tensors):
        raise SpliceError(f"rank {params['rank']}: no tensor is large enough for a rank-{params['rank']} factorization "
                          f"to be smaller than the tensor itself; choose a smaller rank")


def compress(deltas: Delta | Mapping[str, Delta], methods: str | list[str], *, seed: int = 0,
             progress: bool = False, **params: Any) -> tuple[Any, CompressReport]:
    """Compress one delta or a whole DeltaSet with a chain of methods.

    Args:
        deltas: a `Delta` (any form but the multiplicative `Scale`) or a `DeltaSet` (lazy ones are streamed).
        methods: ``"dare,quantize"`` or a list of names; see `splice.compress.compressor_names()`.
        seed: seed of the random methods (DARE, DAREx), per tensor name.
        **params: method parameters (``density=0.1, bits=4, group_size=128, rank=16, ...``); each goes to every
            method of the chain that has it, and one that none has is an error.

    Returns:
        ``(compressed, report)``: a `Packed` delta (for a Delta) or a `DeltaSet` of them, and the `CompressReport`.

    Raises:
        SpliceError: an unknown method or parameter, methods out of order, a bad value, an uncompressible delta.
    """
    chain = parse_methods(methods, params)
    label = ",".join(m.name for m, _ in chain)
    report = CompressReport(label)
    single = not isinstance(deltas, Mapping)
    items = {"delta": deltas} if single else deltas
    out: dict[str, Packed] = {}
    names = list(items)
    for name in tqdm(names, desc=f"compress {label}", disable=not progress, leave=False):
        before = items[name]
        packed = _one(before, chain, name, seed)
        dense_before = before.materialize()
        err = relative_error(dense_before, packed.materialize())
        nbytes_before = before.nbytes
        report.tensors.append(TensorReport(name, describe(before), describe(packed), nbytes_before, packed.nbytes,
                                           err))
        out[name] = packed
        del dense_before
    _check_lowrank_applied(chain, report, params)
    if single:
        return out["delta"], report
    src = deltas if isinstance(deltas, DeltaSet) else DeltaSet()
    config = {"methods": [{"name": m.name, "config": _config_dict(c)} for m, c in chain], "seed": seed,
              "source": {"method": src.method, "config": src.config}}
    return DeltaSet(out, base=src.base, fingerprint=dict(src.fingerprint), method="compressed", config=config), report


def _config_dict(config: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(config)
