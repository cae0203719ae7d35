"""The compressed-delta folder: ``delta_config.json`` + ``delta.safetensors``, the shape of an adapter folder.

``delta_config.json`` names the format and, per tensor, its form: ``kind`` (dense / lowrank), ``shape``, ``scale``
and each part's ``shape``, ``nnz``, ``index`` encoding (none / mask / int32) and ``bits`` / ``group_size`` when
quantized; plus the methods and their configs, the base model and the fingerprints of the base tensors touched.
``delta.safetensors`` holds, per part, ``<tensor>::<part>::values`` (plain float values) or ``::codes`` (uint8
bit-planes) + ``::scales`` (float32), and ``::mask`` (packed bits) or ``::index`` (int32) when sparse.

Side files of an adapter (``head.safetensors``, ``task.json``) are copied along. `load_compressed` gives a
`DeltaSet` of `Packed` deltas; `compressed_deltaset` also maps its names onto a base checkpoint and checks shapes
and fingerprints, which is how `splice apply` and `splice merge` take such a folder.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from splice.compress.codec import CTensor, Packed, QTensor, _pack_bits, _unpack_bits, index_nbytes, n_scales
from splice.delta.deltaset import DeltaSet, fingerprints_match, tensor_fingerprint
from splice.errors import SpliceError
from splice.io.checkpoints import CheckpointReader, atomic_output_dir, read_json

__all__ = ["DELTA_CONFIG", "DELTA_WEIGHTS", "is_compressed", "save_compressed", "load_compressed",
           "compressed_deltaset"]

DELTA_CONFIG, DELTA_WEIGHTS, FORMAT = "delta_config.json", "delta.safetensors", "splice-compressed-delta"
SIDE_FILES = ("head.safetensors", "task.json")


def is_compressed(path: str | Path) -> bool:
    """Whether `path` is a compressed-delta folder."""
    return (Path(path) / DELTA_CONFIG).is_file()


def _encode_part(key: str, part: CTensor, tensors: dict[str, Tensor]) -> dict[str, Any]:
    meta: dict[str, Any] = {"shape": list(part.shape), "nnz": part.nnz, "index": "none"}
    if part.index is not None:
        how, _ = index_nbytes(part.nnz, math.prod(part.shape))
        meta["index"] = how
        if how == "int32":
            tensors[f"{key}::index"] = part.index.to(torch.int32)
        else:
            bits = torch.zeros(math.prod(part.shape), dtype=torch.bool)
            bits[part.index] = True
            tensors[f"{key}::mask"] = _pack_bits(bits)
    if isinstance(part.values, QTensor):
        meta.update(bits=part.values.bits, group_size=part.values.group_size)
        tensors[f"{key}::codes"] = part.values.codes.contiguous()
        tensors[f"{key}::scales"] = part.values.scales.float().contiguous()
    else:
        tensors[f"{key}::values"] = part.values.reshape(-1).contiguous()
    return meta


def save_compressed(deltas: DeltaSet, out: str | Path, *, force: bool = False,
                    side_files_from: str | Path | None = None) -> Path:
    """Write a DeltaSet of `Packed` deltas (from `splice.compress.compress`) as a compressed-delta folder, atomically.

    Args:
        side_files_from: a folder whose ``head.safetensors`` / ``task.json`` (a classification head) are copied.
    """
    tensors: dict[str, Tensor] = {}
    entries: dict[str, Any] = {}
    for name, d in deltas.items():
        if not isinstance(d, Packed):
            raise SpliceError(f"tensor {name!r}: only compressed (Packed) deltas are saved here, got "
                              f"{type(d).__name__}; run splice.compress.compress first")
        entries[name] = {"kind": d.kind, "shape": list(d.shape), "scale": d.scale,
                         "parts": {p: _encode_part(f"{name}::{p}", part, tensors) for p, part in d.parts.items()}}
    config = {"format": FORMAT, "version": 1, "base_model": deltas.base, "method": deltas.method,
              "config": deltas.config, "fingerprint": deltas.fingerprint, "tensors": entries}
    with atomic_output_dir(out, force=force) as tmp:
        save_file(tensors, str(tmp / DELTA_WEIGHTS), metadata={"format": "pt", "splice": FORMAT})
        # Compact: for a small adapter the per-tensor entries are a visible share of the folder's bytes.
        (tmp / DELTA_CONFIG).write_text(json.dumps(config, separators=(",", ":")) + "\n", encoding="utf-8")
        if side_files_from is not None:
            for f in SIDE_FILES:
                if (Path(side_files_from) / f).is_file():
                    shutil.copy2(Path(side_files_from) / f, tmp / f)
    return Path(out)


def _get(reader: CheckpointReader, key: str, dtype: torch.dtype, numel: int, where: str) -> Tensor:
    if key not in reader:
        raise SpliceError(f"{where}: tensor {key!r} is missing")
    t = reader.get(key)
    if t.dtype != dtype or t.numel() != numel:
        raise SpliceError(f"{where}: tensor {key!r} is {t.dtype} with {t.numel()} values, expected {dtype} with "
                          f"{numel}")
    return t


def _decode_part(reader: CheckpointReader, key: str, meta: Any, where: str) -> CTensor:
    try:
        shape = torch.Size(int(s) for s in meta["shape"])
        nnz, how = int(meta["nnz"]), meta["index"]
        bits, group = meta.get("bits"), int(meta.get("group_size", 0))
    except (KeyError, TypeError, ValueError):
        raise SpliceError(f"{where}: bad entry for part {key!r} (needs shape, nnz, index)") from None
    numel = math.prod(shape)
    index = None
    if how == "int32":
        index = _get(reader, f"{key}::index", torch.int32, nnz, where).long()
    elif how == "mask":
        mask = _get(reader, f"{key}::mask", torch.uint8, math.ceil(numel / 8), where)
        index = _unpack_bits(mask, numel).nonzero().view(-1)
    elif how != "none":
        raise SpliceError(f"{where}: part {key!r} has unknown index encoding {how!r}")
    if index is not None and (index.numel() != nnz or (nnz and (int(index.min()) < 0 or int(index.max()) >= numel))):
        raise SpliceError(f"{where}: part {key!r}: sparse positions do not match nnz={nnz} of shape {tuple(shape)}")
    if index is not None and nnz > 1 and not bool((index[1:] > index[:-1]).all()):
        # Written sorted and unique; a repeated position would be summed when applied but overwritten when
        # re-compressed, two different deltas from one file.
        raise SpliceError(f"{where}: part {key!r}: sparse positions are not strictly increasing")
    n = nnz if index is not None else numel
    if bits is not None:
        groups = n_scales(n, group)
        codes = _get(reader, f"{key}::codes", torch.uint8, int(bits) * math.ceil(n / 8), where)
        values: Tensor | QTensor = QTensor(codes.view(int(bits), -1), _get(reader, f"{key}::scales", torch.float32,
                                                                           groups, where), int(bits), group, n)
    else:
        if f"{key}::values" not in reader:
            raise SpliceError(f"{where}: tensor {key + '::values'!r} is missing")
        values = reader.get(f"{key}::values")
        if not values.is_floating_point() or values.numel() != n:
            raise SpliceError(f"{where}: tensor {key + '::values'!r} has {values.numel()} {values.dtype} values, "
                              f"expected {n} floats")
    return CTensor(shape, values, index)


def load_compressed(path: str | Path) -> DeltaSet:
    """A compressed-delta folder as a DeltaSet of `Packed` deltas (keyed by the names it was saved with).

    Raises:
        SpliceError: a missing, corrupt or truncated file, or an entry that does not match the stored tensors.
    """
    path = Path(path)
    cfg_file = path / DELTA_CONFIG
    cfg = read_json(cfg_file)
    if cfg.get("format") != FORMAT or not isinstance(cfg.get("tensors"), dict):
        raise SpliceError(f"{cfg_file}: not a splice compressed-delta config (format {cfg.get('format')!r})")
    reader = CheckpointReader(path / DELTA_WEIGHTS)
    where = str(path / DELTA_WEIGHTS)
    deltas: dict[str, Packed] = {}
    for name, entry in cfg["tensors"].items():
        try:
            parts = {p: _decode_part(reader, f"{name}::{p}", m, where) for p, m in entry["parts"].items()}
            scale = float(entry.get("scale", 1.0))
            if entry["kind"] == "dense" and scale != 1.0:  # only a low-rank entry has a scale; a dense one ignores it
                raise SpliceError(f"a dense entry has scale {scale}, which it cannot carry (only lowrank does)")
            deltas[name] = Packed(entry["kind"], parts, entry["shape"], scale)
        except SpliceError as err:
            msg = str(err)
            raise SpliceError(msg if msg.startswith(where) else f"{where}: tensor {name!r}: {msg}") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise SpliceError(f"{cfg_file}: bad entry for tensor {name!r} ({type(err).__name__}: {err})") from None
    reader.close()
    return DeltaSet(deltas, base=cfg.get("base_model"), fingerprint=cfg.get("fingerprint") or {},
                    method=cfg.get("method") or "compressed", config=cfg.get("config") or {})


def compressed_deltaset(path: str | Path, base: CheckpointReader) -> DeltaSet:
    """`load_compressed`, with names mapped onto `base` (which may add or drop a prefix like 'bert.'), shapes and
    recorded fingerprints checked.

    Raises:
        SpliceError: a tensor the base lacks, a shape that differs, or fingerprints showing another base.
    """
    from splice.io.peft_format import module_prefixes, resolve_module

    loaded = load_compressed(path)
    names = sorted({k.rsplit(".", 1)[0] for k in base.keys()})
    has = lambda m: any(f"{m}.{p}" in base for p in ("weight", "bias")) or m in base  # noqa: E731
    where = str(path)
    out: dict[str, Any] = {}
    prints: dict[str, str] = {}
    for name, d in loaded.items():
        module, _, leaf = name.rpartition(".")
        target = f"{resolve_module(module, has, names, module_prefixes(), where)}.{leaf}" if module else name
        if target not in base:
            raise SpliceError(f"{where}: tensor {name!r} is not in the base {base.path}")
        if tuple(base.shape(target)) != tuple(d.shape):
            raise SpliceError(f"{where}: tensor {name!r} has shape {tuple(d.shape)}, the base tensor {target} "
                              f"{tuple(base.shape(target))}")
        expected = loaded.fingerprint.get(name)
        if expected and not fingerprints_match(tensor_fingerprint(base.get(target)), expected):
            raise SpliceError(f"{where}: this delta was made for another base model: tensor {target} differs")
        out[target] = d
        if expected:
            prints[target] = expected
    return DeltaSet(out, base=str(base.path), fingerprint=prints, method=loaded.method, config=loaded.config)
