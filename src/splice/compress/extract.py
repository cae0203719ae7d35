"""`splice extract`: a full fine-tune minus its base, as a LoRA adapter in PEFT format, streaming tensor by tensor.

For every changed 2-D weight ΔW = W_ft − W_0 of a linear or embedding layer, the truncated SVD (`linalg`) gives
B = U_r √S_r and A = √S_r V_rᵀ, the best rank-r approximation (Eckart–Young), written with lora_alpha = r so
PEFT's scale α/r is 1. The rank is fixed (``rank``) or chosen per tensor from its spectrum (``energy``: the fewest
singular values holding that share of ‖ΔW‖²_F; PEFT's rank_pattern / alpha_pattern carry the per-module ranks); a
matrix with fewer rows or columns than the rank gets its full rank, as in mergekit.
Embeddings are stored as PEFT's lora_embedding_A (r, num_embeddings) / lora_embedding_B (dim, r), whose update
is (BA)ᵀ, and GPT-2's Conv1D weights, stored (in, out), with ``fan_in_fan_out``; which module is which comes from
the base's architecture built on the meta device (names only where it cannot be built). With ``extras`` (default),
changed biases of linear layers are written as trained biases (``bias: all``) and changed norms and other tensors
as ``modules_to_save``, all at full precision, so the adapter reproduces the whole fine-tune up to the truncation. Only two tensors of the models are in memory at a time.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from splice.compress.linalg import truncated_svd
from splice.compress.pipeline import CompressReport, TensorReport
from splice.delta.deltaset import DeltaSet
from splice.errors import SpliceError
from splice.io.checkpoints import atomic_output_dir, write_json
from splice.io.models import module_kinds
from splice.io.peft_format import CONFIG_FILE, PREFIX, SPLICE_FILE, WEIGHTS_FILE

__all__ = ["extract"]

_EMBED_HINTS = ("embed", "wte", "wpe", "shared")


def _is_embedding(name: str) -> bool:
    return any(h in name.rsplit(".", 1)[0].split(".")[-1] for h in _EMBED_HINTS)


def _peft_config(base: str, ranks: dict[str, int], biases: bool, saved: set[str], fan_in_fan_out: bool) -> dict:
    """adapter_config.json: alpha = r everywhere (scale 1), per-module ranks in rank_pattern / alpha_pattern."""
    r_max = max(ranks.values())
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "revision": None,
        "r": r_max, "lora_alpha": r_max, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
        "bias": "all" if biases else "none", "target_modules": sorted(ranks), "exclude_modules": None,
        "modules_to_save": sorted(saved) or None, "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True,
        "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {m: r for m, r in ranks.items() if r != r_max},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != r_max},
    }


def _check_args(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise SpliceError("extract: give exactly one of --rank or --energy")
    if rank is not None and rank < 1:
        raise SpliceError(f"--rank: must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise SpliceError(f"--energy: must be in (0, 1], got {energy}")


def extract(base: str, finetuned: str | Path, out: str | Path, *, rank: int | None = None,
            energy: float | None = None, extras: bool = True, force: bool = False,
            progress: bool = True) -> CompressReport:
    """Write `finetuned` − `base` as a PEFT LoRA folder at `out` (atomically) and return the per-tensor report.

    Args:
        base: the base model ('default', a folder or a hub id).
        finetuned: the full fine-tuned model folder (same architecture and tensor names).
        rank: LoRA rank of every 2-D weight; or `energy` in (0, 1] to choose it per tensor.
        extras: also write changed biases and norms at full precision (otherwise they are dropped).

    Raises:
        SpliceError: neither or both of rank/energy, a rank larger than a target tensor allows, models that do not
            match; nothing is written then.
    """
    from splice.apply import base_folder

    _check_args(rank, energy)
    base_dir = base_folder(base)
    deltas = DeltaSet.from_checkpoints(base_dir, finetuned)
    kinds = module_kinds(base_dir)

    def kind_of(name: str) -> str:
        module = name.rsplit(".", 1)[0]
        return kinds.get(module) or ("embedding" if _is_embedding(name) else "linear")

    # A 2-D weight of any other module (a bare parameter, a custom layer) cannot take a PEFT LoRA: saved whole.
    targets = [n for n in deltas if n.endswith(".weight") and len(deltas.delta_shape(n)) == 2
               and kind_of(n) in ("linear", "conv1d", "embedding")]
    # As mergekit: a matrix smaller than the rank gets its full rank (exact); a rank above what even the largest
    # matrix allows is surely a mistake.
    widest = max(targets, key=lambda n: min(deltas.delta_shape(n)), default=None)
    if rank is not None and widest is not None and rank > min(deltas.delta_shape(widest)):
        raise SpliceError(f"--rank {rank}: larger than any weight allows; the largest, {widest!r} of shape "
                          f"{tuple(deltas.delta_shape(widest))}, allows at most rank {min(deltas.delta_shape(widest))}")
    report = CompressReport(f"extract rank={rank}" if rank is not None else f"extract energy={energy}")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    biases, saved = set(), set()
    module_biases: dict[str, torch.Tensor] = {}  # placed once every LoRA module is known
    fingerprint: dict[str, str] = {}
    for name in tqdm(list(deltas), desc="extract", disable=not progress, leave=False):
        d = deltas[name].tensor  # fp32 (out, in) or 1-D
        if not bool(d.any()):
            continue  # unchanged: nothing to store
        module = name.rsplit(".", 1)[0]
        before = d.numel() * 4
        if name in targets:
            B, A, _ = truncated_svd(d, rank, energy)
            r = B.shape[1]
            if r == 0:
                continue
            # float32 (the stored precision): a float64 copy of a large embedding would cost more than its SVD
            err = float(torch.addmm(d, B, A, alpha=-1).norm() / d.norm())
            kind = kind_of(name)
            if kind == "embedding":  # PEFT's embedding LoRA: ΔW (num, dim) = (B_p A_p)ᵀ, A_p (r, num), B_p (dim, r)
                tensors[f"{PREFIX}{module}.lora_embedding_A"] = B.t().contiguous()
                tensors[f"{PREFIX}{module}.lora_embedding_B"] = A.t().contiguous()
            elif kind == "conv1d":  # stored (in, out): ΔWᵀ = Aᵀ Bᵀ, so lora_A (r, in) = Bᵀ and lora_B (out, r) = Aᵀ
                tensors[f"{PREFIX}{module}.lora_A.weight"] = B.t().contiguous()
                tensors[f"{PREFIX}{module}.lora_B.weight"] = A.t().contiguous()
            else:
                tensors[f"{PREFIX}{module}.lora_A.weight"] = A
                tensors[f"{PREFIX}{module}.lora_B.weight"] = B
            ranks[module] = r
            fingerprint[name] = deltas.fingerprint[name]
            report.tensors.append(TensorReport(name, "dense", f"lowrank r{r}", before, 4 * r * sum(d.shape), err))
        elif extras:
            ft = deltas.ft_reader.get(name)
            if name.endswith(".bias") and f"{module}.weight" in targets:
                module_biases[module] = ft.contiguous()
            else:
                tensors[f"{PREFIX}{name}"] = ft.contiguous()
                saved.add(module)
            report.tensors.append(TensorReport(name, "dense", "full", before, ft.numel() * ft.element_size(), 0.0))
        else:
            report.tensors.append(TensorReport(name, "dense", "dropped", before, 0, 1.0))
    if not ranks:
        raise SpliceError(f"{finetuned}: no 2-D weight differs from the base {base}; nothing to extract")
    for module, bias in module_biases.items():
        # PEFT keeps a LoRA module's bias under its wrapper; a module without a LoRA is never wrapped, and with
        # bias "all" its bias loads under its own name (PEFT drops a `base_layer` key there).
        tensors[f"{PREFIX}{module}{'.base_layer' if module in ranks else ''}.bias"] = bias
        biases.add(module)
    # A module whose weight is saved whole must not also get a LoRA (PEFT would refuse the overlap).
    saved -= set(ranks)
    conv1d = any(kind_of(f"{m}.weight") == "conv1d" for m in ranks)  # PEFT sets it back to False on nn.Linear
    config = _peft_config(str(base), ranks, bool(biases), saved, conv1d)
    with atomic_output_dir(out, force=force) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, config)
        write_json(tmp / SPLICE_FILE, {"method": "lora", "extracted": {"base": str(base), "finetuned": str(finetuned),
                                                                       "rank": rank, "energy": energy},
                                       "fingerprint": fingerprint})
    deltas.base_reader.close()
    deltas.ft_reader.close()
    return report
