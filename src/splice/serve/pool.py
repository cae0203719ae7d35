"""The adapter pool: adapters loaded into the one base model on first use, bounded by bytes, least recently used out.

Every adapter lives *in* the served model (as a named adapter of its wrapper layers, the same objects
`splice.mixed_batch` groups rows by), so a batch that mixes adapters needs no copying of adapter weights. The pool
only decides which adapters are resident:

- a request *acquires* its adapter (loading it from disk if needed) and *releases* it when done; an acquired
  adapter is never evicted, so no running request loses its weights;
- when the resident adapters exceed `max_bytes`, the least recently used ones that no request holds are deleted;
- `unload` removes an adapter now, or, while requests still hold it, as soon as the last one releases it.

Names are checked before they touch the file system: a request's `model` field is user input, and a name such as
`../../etc` must not reach outside the adapter folder. The caller serialises pool calls with model forwards (the
engine's lock), since loading and deleting adapters re-wrap the model's modules.
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from splice.adapters.inject import adapter_layers
from splice.adapters.model import configs, delete_adapter
from splice.adapters.persist import load_adapter
from splice.adapters.prompts.persist import is_prompt_folder
from splice.errors import SpliceError, closest
from splice.io.peft_format import CONFIG_FILE

# Letters, digits, '-' and '_' (no '.', '/' or '\\'): safe as a folder name and as a key of the model's ModuleDicts.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


class UnknownAdapter(SpliceError):
    """No adapter of that name exists (HTTP 404)."""


class AdapterLoadError(SpliceError):
    """The adapter exists but its files cannot be loaded into this base (HTTP 500: the server's files are at fault)."""


class PoolFull(SpliceError):
    """No room for the adapter: the others are in use (`retry` True: wait for one to finish) or it is larger than
    the whole adapter memory (`retry` False)."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


@dataclass
class _Entry:
    nbytes: int
    holders: int = 0
    unload_when_idle: bool = False


def check_name(name: str) -> str:
    """`name` if it is a valid adapter name, else a SpliceError saying what is allowed."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SpliceError(f"adapter name {str(name)[:80]!r} is not valid: use 1-128 letters, digits, '-' and '_', "
                          f"starting with a letter or digit")
    return name


def adapter_nbytes(model: nn.Module, name: str) -> int:
    """Bytes of adapter `name`'s tensors (parameters and buffers) across the model; a tensor shared by several
    modules (VeRA's projections, Compacter's PHM matrices) counts once."""
    seen: dict[int, int] = {}
    for _, layer in adapter_layers(model):
        if name in layer.adapters:
            module = layer.adapters[name]
            for t in [*module.parameters(), *module.buffers()]:
                seen[t.untyped_storage().data_ptr()] = max(seen.get(t.untyped_storage().data_ptr(), 0),
                                                           t.untyped_storage().nbytes())
    return sum(seen.values())


class AdapterPool:
    """Adapters of one base model, loaded on demand from `folder` (one sub-folder per adapter) or explicit paths.

    Args:
        model: the served base model; adapters are loaded into it under their own names.
        folder: where `<name>/adapter_config.json` lives for each adapter; None for explicit paths only.
        paths: extra adapters by name → folder (chosen by the operator, so they may live anywhere).
        max_bytes: the most bytes resident adapters may take before idle ones are evicted.
    """

    def __init__(self, model: nn.Module, folder: str | Path | None = None, *,
                 paths: dict[str, str | Path] | None = None, max_bytes: int = 1 << 30):
        self.model = model
        self.folder = Path(folder).resolve() if folder is not None else None
        if self.folder is not None and not self.folder.is_dir():
            raise SpliceError(f"adapter folder {folder} does not exist")
        self.paths = {check_name(n): Path(p) for n, p in (paths or {}).items()}
        self.max_bytes = int(max_bytes)
        self._resident: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        # Also the engine's lock: loading or deleting an adapter re-wraps modules, never during a forward.
        self.lock = threading.RLock()
        self.loads = self.evictions = 0

    # -- names ---------------------------------------------------------------------------------------------------
    def path_of(self, name: str) -> Path:
        """The folder of adapter `name`; raises UnknownAdapter (or SpliceError for a bad name)."""
        check_name(name)
        if name in self.paths:
            return self.paths[name]
        if self.folder is not None:
            path = (self.folder / name).resolve()
            # The name pattern already forbids separators and dots; resolving also refuses a symlink out.
            if path.parent == self.folder and (path / CONFIG_FILE).is_file():
                return path
        raise UnknownAdapter(f"no adapter named {name!r}{closest(name, self.available())}")

    def available(self) -> list[str]:
        """Every adapter name a request may use (loaded or not), sorted."""
        names = set(self.paths)
        if self.folder is not None:
            try:
                names |= {p.name for p in self.folder.iterdir()
                          if NAME.fullmatch(p.name) and (p / CONFIG_FILE).is_file()}
            except OSError:  # the folder was removed or swapped away: only the named adapters are left
                pass
        return sorted(names)

    def resident(self) -> dict[str, int]:
        """Loaded adapter → its bytes, least recently used first."""
        with self.lock:
            return {n: e.nbytes for n, e in self._resident.items()}

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._resident.values())

    # -- use -----------------------------------------------------------------------------------------------------
    def acquire(self, name: str) -> None:
        """Make adapter `name` resident (loading it if needed) and hold it until `release(name)`.

        An adapter an `unload` is waiting on stays marked: it goes (and the next request loads it afresh from its
        folder) as soon as no request holds it."""
        check_name(name)
        with self.lock:
            entry = self._resident.get(name)
            if entry is None:
                entry = self._load(name)
            entry.holders += 1
            self._resident.move_to_end(name)

    def release(self, name: str) -> None:
        check_name(name)
        with self.lock:
            entry = self._resident.get(name)
            if entry is None:
                return
            entry.holders = max(0, entry.holders - 1)
            if entry.holders == 0 and entry.unload_when_idle:
                self._delete(name)

    def load(self, name: str) -> None:
        """Load adapter `name` now (an admin call), without holding it."""
        self.acquire(name)
        self.release(name)

    def unload(self, name: str) -> bool:
        """Remove adapter `name`; returns False when requests still hold it (it goes when the last one is done)."""
        check_name(name)
        with self.lock:
            entry = self._resident.get(name)
            if entry is None:
                raise UnknownAdapter(f"adapter {name!r} is not loaded; loaded: {', '.join(self._resident) or 'none'}")
            if entry.holders:
                entry.unload_when_idle = True
                return False
            self._delete(name)
            return True

    # -- internals -----------------------------------------------------------------------------------------------
    def _load(self, name: str) -> _Entry:
        path = self.path_of(name)
        if is_prompt_folder(path):  # its virtual tokens would reach every row: the engine batches weight adapters
            raise AdapterLoadError(f"adapter {name!r} is a prompt adapter (virtual tokens), which splice serve "
                                   "cannot batch with other requests; serve weight adapters (LoRA and the like)")
        if name in configs(self.model):
            raise AdapterLoadError(f"adapter {name!r} is already on the model but not in the pool")
        try:
            load_adapter(self.model, path, name)
        except SpliceError as exc:  # the loader checks everything before it touches the model
            raise AdapterLoadError(f"adapter {name!r} cannot be loaded: {exc}") from exc
        except Exception as exc:  # e.g. a config whose values crash a method's constructor
            raise AdapterLoadError(f"adapter {name!r} cannot be loaded: {type(exc).__name__}: {exc}") from exc
        entry = _Entry(adapter_nbytes(self.model, name))
        self._resident[name] = entry
        self.loads += 1
        held = sum(e.nbytes for n, e in self._resident.items() if n != name and e.holders)
        if entry.nbytes + held > self.max_bytes:  # evicting the idle ones could not make room: keep them
            self._delete(name)
            alone = entry.nbytes <= self.max_bytes
            raise PoolFull(f"adapter {name!r} ({entry.nbytes} bytes) does not fit in the adapter memory "
                           f"({self.max_bytes} bytes)" + (" next to the adapters in use" if alone else ""), alone)
        self._evict(keep=name)  # the idle ones, least recently used first, until it fits
        return entry

    def _evict(self, keep: str) -> None:
        for name in list(self._resident):  # least recently used first
            if self.nbytes <= self.max_bytes:
                return
            if name != keep and self._resident[name].holders == 0:
                self._delete(name)
                self.evictions += 1

    def _delete(self, name: str) -> None:
        del self._resident[name]
        delete_adapter(self.model, name)
