"""`DeltaSet`: the deltas of a whole fine-tune, keyed by tensor name in the base checkpoint.

A DeltaSet is what gets saved, loaded, compressed, merged, applied and served. Besides the deltas it records which
base it belongs to: a model id or path, and a fingerprint of each base tensor it touches, so applying it to the
wrong base fails loudly instead of silently producing a broken model.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from splice.delta.forms import Delta, Dense
from splice.errors import SpliceError, closest

__all__ = ["DeltaSet", "GroupedLazyDeltaSet", "LazyDiffDeltaSet", "fingerprints_match", "tensor_fingerprint"]

_SAMPLES = 8


def tensor_fingerprint(t: Tensor) -> str:
    """A short, human-readable description of a tensor that tells one base model from another.

    ``"<shape>:<rms>:<v1>,...,<v8>"``: the shape, the root mean square and 8 values at fixed strided positions.
    It is compared with a tolerance (`fingerprints_match`), not byte for byte, so the float rounding of a
    merge/unmerge round trip or of a bf16 → fp32 cast does not make a base look foreign, while another
    pretrained model (different values everywhere) does.
    """
    t = t.detach()
    flat = t.reshape(-1).double()
    shape = "x".join(str(d) for d in t.shape) or "scalar"
    if not flat.numel():
        return f"{shape}:0:"
    rms = float(flat.pow(2).mean().sqrt())
    step = max(1, flat.numel() // _SAMPLES)
    sample = flat[::step][:_SAMPLES].tolist()
    return f"{shape}:{rms:.6e}:" + ",".join(f"{v:.4e}" for v in sample)


def fingerprints_match(a: str, b: str, rtol: float = 1e-2) -> bool:
    """True when two `tensor_fingerprint`s describe the same tensor up to rounding (relative to its RMS)."""
    try:
        shape_a, rms_a, vals_a = a.split(":")
        shape_b, rms_b, vals_b = b.split(":")
        ra, rb = float(rms_a), float(rms_b)
        va = [float(v) for v in vals_a.split(",") if v]
        vb = [float(v) for v in vals_b.split(",") if v]
    except ValueError:
        return a == b
    tol = rtol * max(ra, rb, 1e-12)
    # Plus a relative term per value: the same base stored in bfloat16 rounds a sampled entry far above the RMS by
    # up to 2⁻⁸ of itself, which the RMS-based tolerance alone refused.
    return (shape_a == shape_b and abs(ra - rb) <= tol and len(va) == len(vb)
            and all(abs(x - y) <= tol + 2 ** -7 * max(abs(x), abs(y)) for x, y in zip(va, vb)))


class DeltaSet(Mapping[str, Delta]):
    """Tensor name (in the base checkpoint) → `Delta`, plus where it came from.

    Args:
        deltas: The deltas, by tensor name.
        base: Model id or path of the base the deltas apply to.
        fingerprint: Tensor name → `tensor_fingerprint` of the base tensor it touches.
        method: Name of the method that made the deltas (``"lora"``, ``"diff"``...).
        config: The method's configuration, JSON-serialisable.
    """

    def __init__(
        self,
        deltas: Mapping[str, Delta] | None = None,
        *,
        base: str | None = None,
        fingerprint: dict[str, str] | None = None,
        method: str = "",
        config: dict[str, Any] | None = None,
    ) -> None:
        self._deltas: dict[str, Delta] = dict(deltas or {})
        self.base = base
        self.fingerprint: dict[str, str] = dict(fingerprint or {})
        self.method = method
        self.config: dict[str, Any] = dict(config or {})

    def __getitem__(self, name: str) -> Delta:
        try:
            return self._deltas[name]
        except KeyError:
            raise KeyError(f"no delta for tensor {name!r}{closest(name, self._deltas)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._deltas)

    def __len__(self) -> int:
        return len(self._deltas)

    def __contains__(self, name: object) -> bool:
        return name in self._deltas

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} tensors, method={self.method!r}, base={self.base!r})"

    def delta_shape(self, name: str) -> torch.Size:
        """Shape of the weight that delta `name` updates (lazy subclasses answer without reading data)."""
        return self[name].shape

    @property
    def nbytes(self) -> int:
        """Bytes of all stored delta tensors."""
        return sum(d.nbytes for d in self.values())

    def apply_to_state_dict(self, state: MutableMapping[str, Tensor], scale: float = 1.0) -> None:
        """Add ``scale * delta`` to each matching tensor of `state`, in place.

        Every name and shape is checked before any tensor is touched, so a bad DeltaSet leaves `state` unchanged.

        Raises:
            SpliceError: a delta names a tensor `state` lacks, or its shape differs from the tensor's.
        """
        for name in self:
            if name not in state:
                raise SpliceError(f"tensor {name!r}: has a delta but is not in the model{closest(name, state)}")
            shape = self.delta_shape(name)
            if state[name].shape != shape:
                have = tuple(state[name].shape)
                raise SpliceError(f"tensor {name!r}: delta shape {tuple(shape)} does not match weight shape {have}")
        # Weights are often nn.Parameters; an in-place update of a leaf that requires grad must not be recorded.
        with torch.no_grad():
            for name, delta in self.items():
                delta.apply_to(state[name], scale)

    def check_base(self, get_tensor: Callable[[str], Tensor]) -> None:
        """Check that the recorded base fingerprints match the tensors `get_tensor` returns.

        Raises:
            SpliceError: naming the first tensor that is missing or whose fingerprint differs.
        """
        for name, expected in self.fingerprint.items():
            try:
                t = get_tensor(name)
            except (KeyError, SpliceError):
                raise SpliceError(f"adapter was made for another base: tensor {name!r} is missing") from None
            got = tensor_fingerprint(t)
            if not fingerprints_match(got, expected):
                raise SpliceError(
                    f"adapter was made for another base: tensor {name!r} fingerprint differs "
                    f"(expected {expected}, got {got}{f'; made for {self.base}' if self.base else ''})"
                )

    @classmethod
    def from_checkpoints(
        cls, base_path: str | Path, finetuned_path: str | Path, *, rtol_zero: float = 0.0
    ) -> LazyDiffDeltaSet:
        """The lazy difference ``fine-tuned − base`` of two checkpoints; see `LazyDiffDeltaSet`."""
        return LazyDiffDeltaSet(base_path, finetuned_path, rtol_zero=rtol_zero)


class LazyDiffDeltaSet(DeltaSet):
    """``fine-tuned − base`` of two checkpoints, read from disk one tensor at a time.

    Keys are all floating-point tensors present in both checkpoints (equal shapes are required; a non-float buffer
    such as ``position_ids`` may be missing from one of them), whether or not
    they changed: deciding that would mean reading the whole model up front. Looking one up reads the base tensor
    and the fine-tuned tensor, in turn, and returns ``Dense(ft.float() - base.float())``; nothing is cached, so at
    most two tensors are in memory at once. Each lookup also records the base tensor's fingerprint.

    Args:
        base_path: Base checkpoint (anything `CheckpointReader` opens).
        finetuned_path: Fine-tuned checkpoint.
        rtol_zero: Differences with ``|d| <= rtol_zero * |base|`` are set to exactly zero (e.g. to drop the noise
            of a dtype round trip); 0 keeps every difference.

    Raises:
        SpliceError: a tensor is in only one checkpoint, or its shapes differ (named, at construction).
    """

    def __init__(self, base_path: str | Path, finetuned_path: str | Path, *, rtol_zero: float = 0.0) -> None:
        from splice.io.checkpoints import CheckpointReader  # io depends on nothing in delta; keep it that way

        self.base_reader = CheckpointReader(base_path)
        self.ft_reader = CheckpointReader(finetuned_path)
        if rtol_zero < 0:
            raise SpliceError(f"rtol_zero: must be >= 0, got {rtol_zero}")
        self.rtol_zero = float(rtol_zero)
        # Integer buffers (position_ids) are not weights, and newer transformers no longer save them: a tensor in
        # only one checkpoint is an error only when it is floating point.
        only_ft = [n for n in self.ft_reader.keys()
                   if n not in self.base_reader and self.ft_reader.dtype(n).is_floating_point]
        only_base = [n for n in self.base_reader.keys()
                     if n not in self.ft_reader and self.base_reader.dtype(n).is_floating_point]
        for names, where, other in ((only_ft, finetuned_path, base_path), (only_base, base_path, finetuned_path)):
            if names:
                more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
                raise SpliceError(f"tensor {names[0]!r}{more} is in {where} but not in {other}")
        keys: list[str] = []
        for name in self.base_reader.keys():
            if name not in self.ft_reader:
                continue
            b_shape, f_shape = self.base_reader.shape(name), self.ft_reader.shape(name)
            if b_shape != f_shape:
                raise SpliceError(
                    f"tensor {name!r}: shape {tuple(b_shape)} in {base_path} but {tuple(f_shape)} in {finetuned_path}"
                )
            if self.base_reader.dtype(name).is_floating_point and self.ft_reader.dtype(name).is_floating_point:
                keys.append(name)
        super().__init__(base=str(base_path), method="diff", config={"rtol_zero": self.rtol_zero})
        self._keys = keys
        self._key_set = set(keys)

    def __getitem__(self, name: str) -> Dense:
        if name not in self._key_set:
            raise KeyError(f"no delta for tensor {name!r}{closest(name, self._keys)}")
        base = self.base_reader.get(name)
        self.fingerprint[name] = tensor_fingerprint(base)
        # Out of place: tensors from the reader may share memory with its file map or cache.
        base = base.float()
        diff = self.ft_reader.get(name).float() - base
        if self.rtol_zero:
            diff.masked_fill_(diff.abs() <= base.abs() * self.rtol_zero, 0.0)
        return Dense(diff)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._key_set

    def delta_shape(self, name: str) -> torch.Size:
        """Shape of tensor `name`, from the checkpoint header."""
        if name not in self._key_set:
            raise KeyError(f"no delta for tensor {name!r}{closest(name, self._keys)}")
        return self.base_reader.shape(name)

    @property
    def nbytes(self) -> int:
        """Bytes the dense fp32 deltas would take, computed from the headers without reading data."""
        return sum(4 * self.base_reader.shape(n).numel() for n in self._keys)


class GroupedLazyDeltaSet(DeltaSet):
    """A DeltaSet some of whose deltas are computed when looked up, a group at a time (an adapter's module: its
    weight's and bias's deltas come from one computation). The last `keep` groups' deltas are kept, so reading a
    module's tensors in turn computes them once; memory holds `keep` groups' deltas, not the whole model's.

    Args:
        deltas: tensor name → its Delta, or the name of the group that computes it.
        shapes: tensor name → shape, for every name `deltas` maps to a group (answered without computing).
        compute: group name → that group's deltas by tensor name.
        keep: groups kept at once; the merge executor's workers read several modules' tensors interleaved, and
            with fewer kept than they have in flight a module would be computed once per tensor read.
        **kwargs: `DeltaSet`'s base, fingerprint, method and config.
    """

    def __init__(self, deltas: Mapping[str, Delta | str], shapes: Mapping[str, torch.Size],
                 compute: Callable[[str], Mapping[str, Delta]], keep: int = 1, **kwargs: Any) -> None:
        import threading
        from collections import OrderedDict

        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        super().__init__(deltas, **kwargs)  # a group's name stands in `_deltas` for the deltas it computes
        self._shapes = dict(shapes)
        self._compute = compute
        self._keep = keep
        self._recent: OrderedDict[str, Mapping[str, Delta]] = OrderedDict()
        self._lock = threading.Lock()  # the merge executor reads from several threads

    def __getitem__(self, name: str) -> Delta:
        entry = super().__getitem__(name)
        if not isinstance(entry, str):
            return entry
        with self._lock:
            if entry in self._recent:
                self._recent.move_to_end(entry)
            else:
                self._recent[entry] = self._compute(entry)
                while len(self._recent) > self._keep:
                    self._recent.popitem(last=False)
            return self._recent[entry][name]

    def delta_shape(self, name: str) -> torch.Size:
        return self._shapes[name] if isinstance(self._deltas.get(name), str) else self[name].shape
