"""Write safetensors shards whose layout is known before the first tensor is computed, holding one tensor at a time.

A safetensors file is an 8-byte header length, a JSON header (name → dtype, shape, byte offsets) and the raw bytes.
When every output tensor's name, shape and dtype are known in advance — a merge plan knows them — the header can be
written first and each tensor's bytes appended the moment it is computed, then dropped. Peak memory is then one
tensor, where assembling a shard before writing it (`save_safetensors_sharded`) holds a whole shard.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.io.checkpoints import _DTYPES, INDEX_NAME, write_json

__all__ = ["TensorSpec", "write_planned_shards"]

TensorSpec = tuple[str, Sequence[int], torch.dtype]
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _plan(layout: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in layout:
        n = _nbytes(spec[1], spec[2])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in specs:
        if dtype not in _NAMES:
            raise SpliceError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        n = _nbytes(shape, dtype)
        entries[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data then starts 8-byte aligned, as safetensors' own writer does
    return struct.pack("<Q", len(raw)) + raw


def write_planned_shards(layout: Sequence[TensorSpec], tensors: Iterable[tuple[str, Tensor]], out_dir: str | Path,
                         *, max_shard_bytes: int = 2 * 2**30, metadata: dict[str, str] | None = None) -> list[Path]:
    """Write `tensors`, which must arrive in the order, shapes and dtypes of `layout`, as safetensors shards.

    Writes ``model.safetensors`` when everything fits in one shard of `max_shard_bytes`, else
    ``model-0000i-of-0000N.safetensors`` plus an HF ``model.safetensors.index.json`` (the same files as
    `save_safetensors_sharded`). Shards are written under temporary names and renamed only when all are complete.

    Returns:
        The shard paths, in order.

    Raises:
        SpliceError: a tensor arrives out of order, with another shape or dtype, or the stream ends early.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", **(metadata or {})}
    shards = _plan(layout, max_shard_bytes)
    n = len(shards)
    final = ([out_dir / "model.safetensors"] if n == 1
             else [out_dir / f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)])
    tmps = [out_dir / f".{p.name}.tmp" for p in final]
    expected = ((k, spec) for k, specs in enumerate(shards) for spec in specs)
    handle: IO[bytes] | None = None
    current = -1
    try:
        for name, t in tensors:
            k, (want, shape, dtype) = next(expected, (None, (None, None, None)))
            if k is None:
                raise SpliceError(f"tensor {name!r} arrives after the last planned tensor")
            if name != want or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise SpliceError(f"tensor {name!r} {tuple(t.shape)} {t.dtype} arrives where {want!r} "
                                  f"{tuple(shape)} {dtype} was planned")
            if k != current:
                if handle is not None:
                    handle.close()
                handle = open(tmps[k], "wb")
                handle.write(_header(shards[k], metadata))
                current = k
            handle.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        if handle is not None:
            handle.close()
            handle = None
        left = next(expected, None)
        if left is not None:
            raise SpliceError(f"the tensor stream ended before tensor {left[1][0]!r}")
        for k in range(current + 1, n):  # shards of zero-size tensors only, never opened above
            tmps[k].write_bytes(_header(shards[k], metadata))
    except BaseException:
        if handle is not None:
            handle.close()
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in zip(tmps, final):
        os.replace(tmp, path)
    if n > 1:
        total = sum(_nbytes(shape, dtype) for _, shape, dtype in layout)
        weight_map = {name: path.name for path, specs in zip(final, shards) for name, _, _ in specs}
        write_json(out_dir / INDEX_NAME, {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map})
    return final
