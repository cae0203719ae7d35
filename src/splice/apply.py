"""`splice apply`: base model + adapter folder → a complete HF model folder with the adapter merged in.

Streams: the base is read one tensor at a time (memory-mapped), the adapter's delta for that tensor is added in
float32, and the result goes to a shard. LoRA's factors are kept; an update computed from the base weight (DoRA's,
OFT's, IA3's, ...) is kept up to 1 GiB in all and past that computed again when its tensor is written
(`adapter_deltaset`), so a large model's updates are never all in memory at once.
"""
from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from splice.adapters.dora import dora_update
from splice.adapters.lora import lora_update
from splice.delta.deltaset import DeltaSet, GroupedLazyDeltaSet, fingerprints_match, tensor_fingerprint
from splice.delta.forms import Delta, Dense
from splice.errors import SpliceError
from splice.io.checkpoints import CheckpointReader, atomic_output_dir, read_json, save_safetensors_sharded, write_json
from splice.io.models import TOKENIZER_FILES, copy_model_files, resolve_model
from splice.io.peft_format import (AdapterFolder, check_saved_base, module_prefixes, read_adapter_folder,
                                   resolve_module, scale_of)


def base_folder(name_or_path: str) -> Path:
    """A local folder for the base: a path as given, or a hub id fetched into the local cache."""
    where = resolve_model(name_or_path)
    if Path(where).is_dir():
        return Path(where)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(where, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                             "*.jinja"]))
    except Exception as exc:
        raise SpliceError(f"base model {name_or_path!r}: not a local folder and not fetchable from the hub "
                          f"({type(exc).__name__})") from None


# Weight-sized updates kept from `adapter_deltaset`'s check (1 GiB); the rest are computed again when read.
KEEP_COMPUTED_BYTES = 1 << 30


def adapter_deltaset(folder: AdapterFolder, base: CheckpointReader, keep_modules: int = 1) -> DeltaSet:
    """The adapter's deltas keyed by the base checkpoint's tensor names, shapes and fingerprints checked.

    LoRA's factors are kept as they are. An update as large as its weight (DoRA's, or any other method's, which is
    computed from the base weight) is computed here to check it and kept while the kept updates fit in
    `KEEP_COMPUTED_BYTES`; past that, it is computed again, a module at a time, when it is read, so that a large
    model's updates are never all in memory at once. `keep_modules` of those recomputed modules are kept at a time
    (one for a reader that goes a module at a time; the merge executor's workers read several interleaved).
    """
    refuse_without_delta(folder)
    names = sorted({k.rsplit(".", 1)[0] for k in base.keys()})
    has = lambda m: f"{m}.weight" in base  # noqa: E731
    where = str(folder.path)
    lora = folder.config.method in ("lora", "dora")
    resolved = {src: resolve_module(src, has, names, module_prefixes(), where) for src in folder.modules}
    prepared = None if lora else folder.config.prepare(_prepare_stand_ins(folder, resolved, base), folder.shared)

    def module_deltas(src: str) -> dict[str, Delta]:
        module, t = resolved[src], folder.modules[src]
        weight = f"{module}.weight"
        if lora:
            return {weight: _lora_delta(folder, src, t, weight, base)}  # checks shapes first: the clearer message
        standin, kind = _stand_in_of(folder, src, module, base)
        return {f"{module}.{p}": d for p, d in _method_delta(folder, prepared, src, t, module, standin, kind).items()}

    entries: dict[str, Delta | str] = {}
    shapes: dict[str, torch.Size] = {}
    kept = 0
    for src, t in folder.modules.items():
        module = resolved[src]
        weight = f"{module}.weight"
        if src in folder.base_weights:
            check_saved_base(folder, src, module, base.get(weight))
        computed = module_deltas(src)
        _check_shapes(computed, base, where)
        size = sum(d.nbytes for d in computed.values())
        if (lora and "lora_magnitude_vector" not in t) or kept + size <= KEEP_COMPUTED_BYTES:
            entries.update(computed)  # LoRA's factors (small), or within the budget: no second computation
            kept += size
        else:
            entries.update(dict.fromkeys(computed, src))
            shapes.update({name: d.shape for name, d in computed.items()})
        del computed
        expected = folder.fingerprint.get(f"{src}.weight")
        if expected and not fingerprints_match(tensor_fingerprint(base.get(weight)), expected):
            raise SpliceError(f"{where}: this adapter was made for another base model: tensor {weight} differs")
    for src, bias in folder.biases.items():
        module = resolve_module(src, has, names, module_prefixes(), where)
        entries[f"{module}.bias"] = Dense(bias.float() - base.get(f"{module}.bias").float())
    for src, state in folder.saved.items():
        module = resolve_module(src, has, names, module_prefixes(), where)
        for pname, value in state.items():
            name = f"{module}.{pname}"
            if name not in base:
                raise SpliceError(f"{where}: modules_to_save tensor {name!r} is not in the base")
            entries[name] = Dense(value.float() - base.get(name).float())
    _check_shapes({n: d for n, d in entries.items() if not isinstance(d, str)}, base, where)
    return GroupedLazyDeltaSet(entries, shapes, module_deltas, keep=keep_modules, base=str(base.path),
                               method=folder.config.method, config=folder.config.to_dict())


def _check_shapes(deltas: dict[str, Delta], base: CheckpointReader, where: str) -> None:
    for name, d in deltas.items():
        if tuple(d.shape) != tuple(base.shape(name)):
            raise SpliceError(f"{where}: the update of {name} has shape {tuple(d.shape)}, the base tensor "
                              f"{tuple(base.shape(name))}")


def refuse_without_delta(folder: AdapterFolder) -> None:
    """One line for a folder whose method is not a weight delta (bottleneck adapters): apply, compress and merge
    need one."""
    from splice.adapters.config import not_a_delta

    if not getattr(folder.config, "has_delta", True):
        raise SpliceError(f"{folder.path}: {not_a_delta(folder.config.method, 'merged or compressed')}")


def _lora_delta(folder: AdapterFolder, src: str, t: dict[str, Tensor], weight: str, base: CheckpointReader) -> Delta:
    config = folder.module_config(src)
    scale = scale_of(config)
    if "lora_embedding_A" in t:
        kind, A, B = "embedding", t["lora_embedding_A"], t["lora_embedding_B"]
    else:
        A, B = t["lora_A.weight"], t["lora_B.weight"]
        kind = "conv2d" if A.dim() == 4 else "conv1d" if folder.peft_config.get("fan_in_fan_out") else "linear"
    A, B = A.float().reshape(A.shape[0], -1), B.float().reshape(B.shape[0], -1)
    shape = tuple(base.shape(weight))
    flat = (shape[0], math.prod(shape[1:]))
    got = (A.shape[1], B.shape[0]) if kind in ("conv1d", "embedding") else (B.shape[0], A.shape[1])
    if got != flat:
        raise SpliceError(f"{folder.path}: the LoRA tensors of {src!r} make an update of shape {got}, but base "
                          f"tensor {weight} has shape {shape}")
    update = lora_update(B, A, scale, kind, torch.Size(shape))
    if "lora_magnitude_vector" not in t:
        return update
    if kind not in ("linear", "conv1d"):
        raise SpliceError(f"{folder.path}: module {src!r} is a DoRA {kind} layer, which splice apply does not merge "
                          "(DoRA on linear layers only)")
    W = base.get(weight).float()
    W = W.t() if kind == "conv1d" else W
    magnitude = t["lora_magnitude_vector"]
    if tuple(magnitude.shape) != (W.shape[0],):
        raise SpliceError(f"{folder.path}: module {src!r}: lora_magnitude_vector has shape {tuple(magnitude.shape)}, "
                          f"the layer has {W.shape[0]} outputs")
    dense = dora_update(W, A, B, magnitude, scale)
    return Dense(dense.t() if kind == "conv1d" else dense)


def _stand_in(weight: Tensor, bias: Tensor | None, fan_in_fan_out: bool) -> tuple[nn.Module, str]:
    """A module holding the base tensors (no copy), so that any method can compute its delta from them."""
    if weight.dim() == 4:
        kind, module = "conv2d", nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False,
                                           device="meta")
    elif weight.dim() == 2 and fan_in_fan_out:
        kind, module = "conv1d", Conv1D(weight.shape[1], weight.shape[0])
    elif weight.dim() == 2:
        kind, module = "linear", nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    elif weight.dim() == 1:  # a norm layer (for methods that wrap any module, as LN tuning)
        kind, module = "module", nn.Module()
    else:
        raise SpliceError(f"a {weight.dim()}-D weight is not a module the adapter's method can wrap")
    module.weight = nn.Parameter(weight, requires_grad=False)
    module.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return module, kind


def _stand_in_of(folder: AdapterFolder, src: str, module: str, base: CheckpointReader,
                 meta: bool = False) -> tuple[nn.Module, str]:
    """(stand-in module holding the base tensors in float32, kind) for folder module `src` (base `module`); with
    `meta`, tensors of the same shapes on the meta device, read from the checkpoint's header only."""
    def tensor(name: str) -> Tensor:
        return torch.empty(tuple(base.shape(name)), device="meta") if meta else base.get(name).float()

    bias = tensor(f"{module}.bias") if f"{module}.bias" in base else None
    try:
        return _stand_in(tensor(f"{module}.weight"), bias, bool(folder.peft_config.get("fan_in_fan_out")))
    except SpliceError as err:
        raise SpliceError(f"{folder.path}: module {src!r}: {err}") from None


def _prepare_stand_ins(folder: AdapterFolder, resolved: dict[str, str],
                       base: CheckpointReader) -> list[tuple[str, nn.Module, str]]:
    """The (name, module, kind) targets `config.prepare` takes: it reads their shapes, and the first one's weight
    for the device and dtype of what it builds, so only that one holds data (the others are on the meta device)."""
    return [(module, *_stand_in_of(folder, src, module, base, meta=i > 0))
            for i, (src, module) in enumerate(resolved.items())]


def _method_delta(folder: AdapterFolder, prepared: Any, src: str, tensors: dict[str, Tensor], module: str,
                  standin: nn.Module, kind: str) -> dict[str, Delta]:
    """A non-LoRA method's deltas for one module: its adapter built on a stand-in of the base module."""
    from splice.adapters.persist import check_module_tensors
    from splice.adapters.registry import get_method

    method = get_method(folder.config.method)
    config = prepared.for_module(src, tensors, folder.peft_config).for_target(module)
    check_module_tensors(method, standin, kind, config, tensors, module, folder.path)
    adapter = method.adapter(standin, kind, config)
    adapter.load_peft_state({k: v.float() for k, v in tensors.items()}, standin)
    return adapter.delta(standin)


def apply_adapter(base: str, adapter: str | Path, out: str | Path, *, force: bool = False,
                  dtype: torch.dtype | None = None, progress: bool = True) -> Path:
    """Write `base` with `adapter` merged in as a complete HF model folder at `out` (atomically).

    Args:
        base: model id or local folder of the base model.
        adapter: a PEFT or splice adapter folder, or a compressed-delta folder (`splice compress`).
        out: the output folder; refused if it exists unless `force` (then replaced atomically).
        dtype: dtype of the written weights (default: each tensor keeps the base's dtype).
    """
    from splice.compress.storage import compressed_deltaset, is_compressed

    folder = None if is_compressed(adapter) else read_adapter_folder(adapter)
    base_dir = base_folder(base)
    reader = CheckpointReader(base_dir)
    # A compressed-delta folder (splice compress) applies like an adapter.
    deltas = compressed_deltaset(adapter, reader) if folder is None else adapter_deltaset(folder, reader)

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for name in reader.keys():
            t = reader.get(name)
            if name in deltas:
                merged = t.to(torch.float32, copy=True)  # the reader may hand out shared storage
                deltas[name].apply_to(merged)
                t = merged.to(t.dtype)
            yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)

    with atomic_output_dir(out, force=force) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            copied = copy_model_files(base_dir, tmp)
        if not set(copied) & set(TOKENIZER_FILES):
            print(f"warning: {base_dir} has no tokenizer files, so {out} has none either", file=sys.stderr)
        if dtype is not None and (tmp / "config.json").is_file():  # else transformers loads it in the old dtype
            config = read_json(tmp / "config.json")
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
            write_json(tmp / "config.json", {**config, **{k: str(dtype).removeprefix("torch.") for k in keys}})
        save_safetensors_sharded(tensors(), tmp, metadata={"format": "pt"}, progress=progress)
    reader.close()
    return Path(out)
