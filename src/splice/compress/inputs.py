"""Open what `splice compress` takes as a DeltaSet: an adapter folder, a compressed-delta folder, or a full
fine-tuned model (with its base: the difference is read lazily, one tensor at a time)."""
from __future__ import annotations

from pathlib import Path

import torch

from splice.compress.storage import compressed_deltaset, is_compressed, load_compressed
from splice.delta.deltaset import DeltaSet, tensor_fingerprint
from splice.delta.forms import Delta
from splice.errors import SpliceError
from splice.io.peft_format import CONFIG_FILE, AdapterFolder, read_adapter_folder, scale_of

__all__ = ["open_deltas"]


def open_deltas(path: str | Path, base: str | None = None) -> DeltaSet:
    """The deltas of `path` as a DeltaSet.

    Args:
        path: a PEFT/splice adapter folder, a compressed-delta folder, or an HF model folder (needs `base`).
        base: the base model ('default', a folder or a hub id). With it, an adapter's names and shapes are checked
            against the base and its non-LoRA parts (DoRA, trained biases, modules_to_save) become dense deltas.

    Raises:
        SpliceError: a missing or unreadable folder, a full model without `base`, an adapter made for another base.
    """
    from splice.apply import adapter_deltaset, base_folder
    from splice.io.checkpoints import CheckpointReader

    path = Path(path)
    if not path.exists():
        raise SpliceError(f"{path}: no such file or folder")
    reader = CheckpointReader(base_folder(base)) if base is not None else None
    if is_compressed(path):
        return compressed_deltaset(path, reader) if reader is not None else load_compressed(path)
    if (path / CONFIG_FILE).is_file():
        folder = read_adapter_folder(path)
        if reader is not None:
            deltas = adapter_deltaset(folder, reader)
            # Recorded so that the compressed folder, too, refuses a base other than this one.
            deltas.fingerprint = {n: tensor_fingerprint(reader.get(n)) for n in deltas}
            return deltas
        return _adapter_without_base(folder)
    if reader is None:
        raise SpliceError(f"{path}: a full model folder is compressed as its difference to a base; pass --base")
    return DeltaSet.from_checkpoints(base_folder(base), path)


def _adapter_without_base(folder: AdapterFolder) -> DeltaSet:
    """LoRA updates keyed '<module>.weight' by the adapter's own module names; shapes come from the factors."""
    from splice.adapters.lora import lora_update
    from splice.apply import refuse_without_delta

    refuse_without_delta(folder)
    if folder.config.method not in ("lora", "dora"):  # only a LoRA's update is its factors' product alone
        raise SpliceError(f"{folder.path}: a {folder.config.method} adapter's update is computed from the base "
                          "weights; pass --base")
    if folder.config.method == "dora" or folder.biases or folder.saved:
        what = "DoRA" if folder.config.method == "dora" else "trained biases" if folder.biases else "modules_to_save"
        raise SpliceError(f"{folder.path}: this adapter has {what}, whose update depends on the base weights; "
                          f"pass --base")
    deltas: dict[str, Delta] = {}
    for module, t in folder.lora.items():
        scale = scale_of(folder.module_config(module))
        if "lora_embedding_A" in t:
            A, B, kind = t["lora_embedding_A"].float(), t["lora_embedding_B"].float(), "embedding"
        else:
            A, B = t["lora_A.weight"].float(), t["lora_B.weight"].float()
            if A.dim() != 2:
                raise SpliceError(f"{folder.path}: module {module!r} is a conv LoRA; its kernel shape needs --base")
            kind = "conv1d" if folder.peft_config.get("fan_in_fan_out") else "linear"
        shape = (A.shape[1], B.shape[0]) if kind in ("conv1d", "embedding") else (B.shape[0], A.shape[1])
        deltas[f"{module}.weight"] = lora_update(B, A, scale, kind, torch.Size(shape))
    return DeltaSet(deltas, base=folder.peft_config.get("base_model_name_or_path"), fingerprint=folder.fingerprint,
                    method=folder.config.method, config=folder.config.to_dict())
