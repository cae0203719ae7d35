"""The inputs of a merge, read one tensor at a time.

An input is either a full HF model folder (safetensors, sharded or not, memory-mapped through `CheckpointReader`)
or a LoRA/DoRA adapter folder (it has ``adapter_config.json``) or a compressed-delta folder (``delta_config.json``,
from ``splice compress``). An adapter reads as ``base + ΔW`` per tensor, lazily:
``ΔW = s·B·A`` is formed only for the tensor being merged. It is checked against its base when opened (every update
fits its base tensor; base fingerprints, when ``splice_config.json`` records them, match), so an adapter made for
another base fails before anything is written.

Model ids: a local folder, or a hub id fetched with ``huggingface_hub.snapshot_download`` (an error says so when
offline). In a config, ``"model+adapter"`` applies `adapter` to `model`; a bare adapter folder is applied to
``base_model``.
"""
from __future__ import annotations

import math

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from splice.delta.deltaset import DeltaSet
from splice.delta.forms import Scale
from splice.errors import SpliceError
from splice.io.checkpoints import CheckpointReader, read_json
from splice.io.models import resolve_model
from splice.io.peft_format import CONFIG_FILE, read_adapter_folder

__all__ = ["MergeInput", "ModelFolder", "LoraInput", "InputSet", "local_folder", "check_finite"]

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken",
                 "adapter_model.bin", "pytorch_model.bin"]  # older folders: read weights-only, as local ones are


def local_folder(path: str, revision: str | None = None, where: str = "model") -> Path:
    """A local folder for a model reference: the folder itself, or a hub snapshot in the local cache.

    Raises:
        SpliceError: a path that does not exist, or a hub id that cannot be fetched (offline, unknown, gated).
    """
    try:
        resolved = resolve_model(path)
    except SpliceError as err:
        raise SpliceError(f"{where}: {err}") from None
    if Path(resolved).is_dir():
        return Path(resolved)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(resolved, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated, ...: all mean "cannot get it"
        text = " ".join(str(exc).split())[:200]
        raise SpliceError(f"{where}: {path!r} is not a local folder and could not be fetched from the hub "
                          f"({type(exc).__name__}: {text}); check the path, or the network / HF_HUB_OFFLINE") from None


def check_finite(t: Tensor, where: str, name: str) -> Tensor:
    """Return `t`, or raise naming the input and tensor when it holds NaN or inf."""
    # Any NaN/inf makes the sum non-finite, and a sum is one fast reduction where isfinite().all() writes a mask
    # the size of the tensor; only a non-finite sum (or a legitimate overflow) pays for the exact test.
    if not t.is_floating_point():
        return t
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if not math.isfinite(t.sum(dtype=acc).item()) and not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "inf"
        raise SpliceError(f"{where}: tensor {name!r} holds {bad} values; refusing to merge it")
    return t


class MergeInput:
    """One model of a merge. `where` names it in messages (``models[1] /path/to/model``)."""

    folder: Path
    where: str

    @property
    def config(self) -> dict[str, Any]:
        """The model's ``config.json`` ({} when it has none)."""
        raise NotImplementedError

    def keys(self) -> list[str]:
        raise NotImplementedError

    def __contains__(self, name: object) -> bool:
        raise NotImplementedError

    def shape(self, name: str) -> torch.Size:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, name: str, *, check: bool = True) -> Tensor:
        """The tensor `name`, read now, checked for NaN/inf unless `check` is False (the caller checks)."""
        raise NotImplementedError

    def delta(self, name: str, base: MergeInput) -> Tensor | None:
        """The exact float32 update of `name` against `base` when this input knows it (a LoRA), else None."""
        return None

    def prefetch(self, name: str) -> None:
        """Start reading `name` from disk in the background (a hint; default: nothing)."""

    def close(self) -> None:
        pass


class ModelFolder(MergeInput):
    """A full model folder (local, or a hub snapshot in the local cache), memory-mapped."""

    def __init__(self, folder: Path, where: str) -> None:
        self.folder, self.where = folder, where
        try:
            self.reader = CheckpointReader(folder)
        except SpliceError as err:
            raise SpliceError(f"{where}: {err}") from None
        self._config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}

    @property
    def config(self) -> dict[str, Any]:
        return self._config

    def keys(self) -> list[str]:
        return self.reader.keys()

    def __contains__(self, name: object) -> bool:
        return name in self.reader

    def shape(self, name: str) -> torch.Size:
        return self.reader.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(name)

    def get(self, name: str, *, check: bool = True) -> Tensor:
        t = self.reader.get(name)
        return check_finite(t, self.where, name) if check else t

    def prefetch(self, name: str) -> None:
        self.reader.prefetch(name)

    def close(self) -> None:
        self.reader.close()


class LoraInput(MergeInput):
    """A LoRA/DoRA adapter folder read as its base plus its update, one tensor at a time.

    Args:
        folder: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        base: the model it was trained on.

    Raises:
        SpliceError: an update that does not fit its base tensor, or fingerprints (``splice_config.json``) that
            show the adapter was made for another base.
    """

    def __init__(self, folder: Path, base: ModelFolder, where: str) -> None:
        from splice.apply import adapter_deltaset

        from splice.compress.storage import compressed_deltaset, is_compressed
        from splice.merge.executor import MAX_WORKERS

        self.folder, self.base, self.where = folder, base, where
        try:
            # A compressed-delta folder (splice compress) is a delta like an adapter's; it has no LoRA factors.
            self.adapter = None if is_compressed(folder) else read_adapter_folder(folder)
            self.deltas: DeltaSet = (compressed_deltaset(folder, base.reader) if self.adapter is None
                                     # the executor's tasks in flight, each reading one module's tensor
                                     else adapter_deltaset(self.adapter, base.reader, keep_modules=MAX_WORKERS + 1))
        except SpliceError as err:
            raise SpliceError(f"{where}: {err} (base: {base.folder})") from None

    @property
    def config(self) -> dict[str, Any]:
        return self.base.config

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def shape(self, name: str) -> torch.Size:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def prefetch(self, name: str) -> None:
        self.base.prefetch(name)

    def get(self, name: str, *, check: bool = True) -> Tensor:
        w = self.base.get(name, check=check)
        if name not in self.deltas:
            return w
        # A private copy: the reader hands out the same memory-mapped storage on every read of a name, so an
        # in-place add on it would change what the base (and every later read) sees.
        merged = w.to(torch.float32, copy=True)
        self.deltas[name].apply_to(merged)
        return check_finite(merged, self.where, name) if check else merged

    def delta(self, name: str, base: MergeInput) -> Tensor | None:
        if base is not self.base:
            return None
        if name not in self.deltas:
            return torch.zeros(self.shape(name), dtype=torch.float32)
        # A copy: a Dense form hands out its own tensor, which a method must not be able to change.
        form = self.deltas[name]
        # A multiplicative form (IA3's Scale) is a delta only relative to its base weight.
        d = form.materialize(self.base.get(name).float() if isinstance(form, Scale) else None)
        d = d.to(torch.float32, copy=True)
        return check_finite(d, self.where, name)

    def close(self) -> None:
        self.base.close()


class InputSet:
    """The opened inputs of one merge, each folder opened once however often the config names it.

    Set `base` (the opened ``base_model``) before opening bare adapter folders: they are applied to it.
    """

    def __init__(self) -> None:
        self._models: dict[Path, ModelFolder] = {}
        self._inputs: dict[Any, MergeInput] = {}
        self.base: MergeInput | None = None

    def open(self, ref: Any, where: str) -> MergeInput:
        """The input for a `ModelRef` (opened on first use).

        Raises:
            SpliceError: a missing folder or hub id, a corrupt or truncated checkpoint, an adapter without a base
                or made for another base; one line naming `where`.
        """
        if ref in self._inputs:
            return self._inputs[ref]
        folder = local_folder(ref.path, ref.revision, f"{where} {ref.path!r}")
        label = f"{where} {folder}"
        if ref.lora:
            lora = local_folder(ref.lora, ref.lora_revision, f"{where} {ref.lora!r}")
            inp: MergeInput = LoraInput(lora, self._model(folder, label), f"{where} {lora}")
        elif (folder / CONFIG_FILE).is_file() or (folder / "delta_config.json").is_file():
            if not isinstance(self.base, ModelFolder):
                raise SpliceError(f"{label}: is a LoRA adapter folder, which is merged as a delta on base_model; "
                                  f"set base_model to the full model it was trained on (or write 'MODEL+ADAPTER')")
            inp = LoraInput(folder, self.base, label)
        else:
            inp = self._model(folder, label)
        self._inputs[ref] = inp
        return inp

    def _model(self, folder: Path, where: str) -> ModelFolder:
        key = folder.resolve()
        if key not in self._models:
            self._models[key] = ModelFolder(folder, where)
        return self._models[key]

    def close(self) -> None:
        for m in self._models.values():
            m.close()
