"""Read and write model checkpoints one tensor at a time, and make output folders appear atomically.

`CheckpointReader` opens a single safetensors file, an HF sharded folder (``model.safetensors.index.json``), a PEFT
adapter folder, or a ``pytorch_model.bin``; it validates every safetensors header up front and then reads tensors
lazily through memory maps. `save_safetensors_sharded` streams tensors into shards of bounded size.
`atomic_output_dir` yields a temporary sibling folder that replaces the target only when the block succeeds.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from splice.errors import SpliceError, closest

__all__ = ["CheckpointReader", "save_safetensors_sharded", "atomic_output_dir", "read_json", "write_json"]

INDEX_NAME = "model.safetensors.index.json"
# Looked for in this order in a folder.
WEIGHT_NAMES = (INDEX_NAME, "model.safetensors", "adapter_model.safetensors", "pytorch_model.bin")
_MAX_HEADER = 100 * 2**20  # safetensors itself refuses headers above 100 MB

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}


def read_safetensors_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Parse and check a safetensors header without reading any tensor data.

    Returns:
        ``(entries, metadata)``: tensor name → ``{"dtype", "shape", "data_offsets"}``, and ``__metadata__``.

    Raises:
        SpliceError: the file is not safetensors, or is shorter than its header says (truncated).
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, _MAX_HEADER):
                raise SpliceError(f"{path}: not a safetensors file or truncated (bad header length)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SpliceError(f"{path}: corrupt safetensors file (header is not valid JSON)") from None
    except OSError as e:
        raise SpliceError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(header, dict):
        raise SpliceError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            dtype = entry["dtype"]
            shape = [int(s) for s in entry["shape"]]
            if not isinstance(start, int) or not isinstance(end, int) or not isinstance(dtype, str):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise SpliceError(f"{path}: corrupt safetensors file (bad header entry for {name!r})") from None
        if dtype not in _DTYPES:
            raise SpliceError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not 0 <= start <= end or end > data_len:
            raise SpliceError(
                f"{path}: truncated or corrupt safetensors file (tensor {name!r} ends at byte {end} of the data, "
                f"which holds {data_len} bytes)"
            )
        entry["shape"] = shape
        entry["file_range"] = (8 + n + start, 8 + n + end)
    return header, metadata


class CheckpointReader:
    """Lazy, read-only access to the tensors of one checkpoint.

    Args:
        path: A folder holding ``model.safetensors.index.json`` (HF shards), ``model.safetensors``,
            ``adapter_model.safetensors`` or ``pytorch_model.bin``; or one ``.safetensors`` / ``.bin`` /
            index ``.json`` file.

    Safetensors headers are checked when the reader is built; tensor data is read only by `get`, one tensor at a
    time. A ``.bin`` file is loaded with ``weights_only=True`` (never full unpickling) and memory-mapped when the
    file format allows it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file = self._resolve(self.path)
        self._entries: dict[str, tuple[Path, torch.Size, torch.dtype]] = {}
        self._ranges: dict[str, tuple[int, int]] = {}  # safetensors: the bytes of each tensor in its file
        self._handles: dict[Path, Any] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._bin: dict[str, Tensor] | None = None
        self.metadata: dict[str, Any] = {}
        if self.file.suffix == ".json":
            self._open_index(self.file)
        elif self.file.suffix in (".bin", ".pt", ".pth"):
            self._open_bin(self.file)
        else:
            self._add_safetensors(self.file)

    @staticmethod
    def _resolve(path: Path) -> Path:
        if not path.exists():
            raise SpliceError(f"{path}: no such file or folder")
        if path.is_file():
            return path
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        singles = sorted(path.glob("*.safetensors"))
        if len(singles) == 1:  # e.g. a folder holding only "diffusion_pytorch_model.safetensors"
            return singles[0]
        held = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise SpliceError(f"{path}: no weights file found (looked for {', '.join(WEIGHT_NAMES)}; folder holds {held})")

    def _add_safetensors(self, file: Path) -> dict[str, str]:
        entries, metadata = read_safetensors_header(file)
        for name, e in entries.items():
            self._entries[name] = (file, torch.Size(e["shape"]), _DTYPES[e["dtype"]])
            self._ranges[name] = e["file_range"]
        if not self.metadata:
            self.metadata = dict(metadata)
        return metadata

    def _open_index(self, index_file: Path) -> None:
        index = read_json(index_file)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise SpliceError(f"{index_file}: index has no 'weight_map' object")
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise SpliceError(f"{index_file}: weight_map gives tensor {name!r} the shard {shard!r}, not a file name")
            shards.setdefault(shard, []).append(name)
        for shard, names in shards.items():
            file = index_file.parent / shard
            if not file.is_file():
                raise SpliceError(f"{index_file}: shard {shard!r} (holding {names[0]!r}) is missing")
            self._add_safetensors(file)
        missing = [n for n in weight_map if self._entries.get(n, (None,))[0] != index_file.parent / weight_map[n]]
        if missing:
            raise SpliceError(f"{index_file}: tensor {missing[0]!r} is not in its shard {weight_map[missing[0]]!r}")
        # Only the names the index maps are the checkpoint's tensors.
        self._entries = {n: self._entries[n] for n in weight_map}
        self.metadata = dict(index.get("metadata") or {})

    def _open_bin(self, file: Path) -> None:
        try:
            try:
                state = torch.load(file, weights_only=True, map_location="cpu", mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                state = torch.load(file, weights_only=True, map_location="cpu")
        except Exception as e:  # unpickling errors come in many types; all mean the same to the user
            raise SpliceError(f"{file}: cannot load as a weights-only torch checkpoint ({type(e).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise SpliceError(f"{file}: expected a flat dict of tensors")
        self._bin = state
        self._entries = {k: (file, v.shape, v.dtype) for k, v in state.items()}

    def keys(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> tuple[Path, torch.Size, torch.dtype]:
        try:
            return self._entries[name]
        except KeyError:
            raise SpliceError(f"{self.file}: no tensor named {name!r}{closest(name, self._entries)}") from None

    def shape(self, name: str) -> torch.Size:
        """Shape of tensor `name`, from the header (no data read)."""
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of tensor `name`, from the header (no data read)."""
        return self._entry(name)[2]

    def get(self, name: str) -> Tensor:
        """Read tensor `name` into memory (CPU)."""
        file = self._entry(name)[0]
        if self._bin is not None:  # a copy, so callers' in-place edits never reach the cached (maybe mapped) dict
            return self._bin[name].clone()
        try:
            with self._lock:  # the merge executor reads from several threads
                handle = self._handles.get(file)
                if handle is None:
                    handle = self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            return handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise SpliceError(f"{file}: cannot read tensor {name!r} ({e})") from None

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading tensor `name` from disk now, without waiting for it (a hint: a later
        `get` then finds its pages in memory instead of faulting them in one by one while a merge computes)."""
        if name not in self._ranges or not hasattr(os, "posix_fadvise"):
            return
        file = self._entries[name][0]
        start, end = self._ranges[name]
        try:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY)
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint: the read itself reports real errors

    def close(self) -> None:
        """Drop open file handles and memory maps."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._handles.clear()
        self._bin = None if self._bin is None else {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.file)!r}, {len(self)} tensors)"


def _detach_for_save(t: Tensor, seen_storages: set[int]) -> Tensor:
    t = t.detach().to("cpu")
    storage = t.untyped_storage()
    # safetensors refuses views and tensors sharing memory (tied weights); a private contiguous copy fixes both.
    if (not t.is_contiguous() or t.storage_offset() != 0 or storage.nbytes() != t.numel() * t.element_size()
            or storage.data_ptr() in seen_storages):
        t = t.contiguous().clone()
    seen_storages.add(t.untyped_storage().data_ptr())
    return t


class _ShardWriter:
    """Accumulates tensors and writes each full shard under a temporary name (N is unknown until the end)."""

    def __init__(self, out_dir: Path, metadata: dict[str, str]) -> None:
        self.out_dir, self.metadata = out_dir, metadata
        self.tmp_files: list[Path] = []
        self.names: list[list[str]] = []
        self.shard: dict[str, Tensor] = {}
        self.shard_bytes = 0
        self.storages: set[int] = set()

    def add(self, name: str, t: Tensor, max_shard_bytes: int) -> None:
        nbytes = t.numel() * t.element_size()
        if self.shard and self.shard_bytes + nbytes > max_shard_bytes:
            self.flush()
        self.shard[name] = _detach_for_save(t, self.storages)
        self.shard_bytes += nbytes

    def flush(self) -> None:
        tmp = self.out_dir / f".shard-{len(self.tmp_files) + 1:05d}.tmp"
        self.tmp_files.append(tmp)
        save_file(self.shard, str(tmp), metadata=self.metadata)
        self.names.append(list(self.shard))
        self.shard, self.shard_bytes = {}, 0
        self.storages.clear()

    def discard(self) -> None:
        for tmp in self.tmp_files:
            tmp.unlink(missing_ok=True)


def save_safetensors_sharded(
    tensors: Iterable[tuple[str, Tensor]],
    out_dir: str | Path,
    *,
    max_shard_bytes: int = 2 * 2**30,
    metadata: dict[str, str] | None = None,
    progress: bool = False,
) -> list[Path]:
    """Stream tensors into safetensors shards of at most `max_shard_bytes` each (a larger tensor gets its own).

    Writes ``model.safetensors`` when everything fits in one shard, else ``model-0000i-of-0000N.safetensors`` plus
    an HF ``model.safetensors.index.json``. Only one shard's tensors are held at a time.

    Returns:
        The shard paths, in order.

    Raises:
        SpliceError: a tensor name appears twice, or `out_dir` already holds weights (shards of an earlier save
            would mix with these; write into a fresh folder, e.g. one from `atomic_output_dir`).
    """
    out_dir = Path(out_dir)
    old = sorted(p.name for p in out_dir.glob("*.safetensors*")) if out_dir.is_dir() else []
    if old:
        raise SpliceError(f"{out_dir}: already holds {old[0]}; save into an empty folder (an earlier save's shards "
                          "would mix with the new ones)")
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir, {"format": "pt", **(metadata or {})})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {out_dir.name}")
    seen: set[str] = set()
    total = 0
    try:
        for name, t in tensors:
            if name in seen:
                raise SpliceError(f"tensor {name!r} appears twice in the output")
            seen.add(name)
            writer.add(name, t, max_shard_bytes)
            total += t.numel() * t.element_size()
            if bar is not None:
                bar.update(t.numel() * t.element_size())
        if writer.shard or not writer.tmp_files:
            writer.flush()
    except BaseException:
        writer.discard()
        raise
    finally:
        if bar is not None:
            bar.close()

    n = len(writer.tmp_files)
    if n == 1:
        final = [out_dir / "model.safetensors"]
    else:
        final = [out_dir / f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for tmp, path in zip(writer.tmp_files, final):
        os.replace(tmp, path)
    if n > 1:
        weight_map = {name: path.name for path, names in zip(final, writer.names) for name in names}
        index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
        write_json(out_dir / INDEX_NAME, index)
    return final


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories; nothing to do then
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fresh_sibling(out: Path, tag: str) -> Path:
    while True:
        path = out.parent / f".{out.name}.{tag}-{secrets.token_hex(4)}"
        if not path.exists():
            return path


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out`; it becomes `out` only if the block finishes without error.

    On success every file is fsynced, an existing `out` is renamed aside, the temporary folder is renamed to `out`,
    and the old one is deleted. On error the temporary folder is deleted and an existing `out` is left untouched.

    Raises:
        SpliceError: `out` exists and `force` is False (raised before yielding).
    """
    out = Path(out)
    if out.exists() and not force:
        raise SpliceError(f"{out}: output folder exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_sibling(out, "tmp")
    tmp.mkdir()  # unlike mkdtemp's 0700, mkdir honours the umask, so the final folder gets normal permissions
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists() or out.is_symlink():
        old = _fresh_sibling(out, "old")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of `path`, or a one-line SpliceError naming it (missing, unreadable, not UTF-8)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpliceError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpliceError(f"{path}: cannot read ({e})") from None


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object from `path`.

    Raises:
        SpliceError: the file is missing, unreadable, not valid JSON (with line and column) or not an object.
    """
    text = read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpliceError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(obj, dict):
        raise SpliceError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_yaml(text: str, path: str | Path) -> Any:
    """`yaml.safe_load(text)`, with a one-line SpliceError naming `path` on invalid YAML."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpliceError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `path` to write; it replaces `path` only if the block finishes without
    error, so a crash never leaves half a file and writers side by side never share a temporary name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write `obj` as JSON (indented by default), through a temporary file (`atomic_file`)."""
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys)
        f.write("\n")
