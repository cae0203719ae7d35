"""Read and write PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors` with PEFT key names.

Each method owns its key names, shapes and config translation (see `AdapterFolder`); LoRA's, for example:

    base_model.model.<module>.lora_A.weight        (r, in)          lora_embedding_A  (r, num_embeddings)
    base_model.model.<module>.lora_B.weight        (out, r)         lora_embedding_B  (dim, r)
    base_model.model.<module>.lora_magnitude_vector (out,)          DoRA only
    base_model.model.<module>.bias / .weight        a trained bias, or a `modules_to_save` module in full
    base_model.model.<module>.base_layer.bias       the trained bias of a LoRA-wrapped module (bias != none)

Such folders load in PEFT, vLLM and LoRAX. splice adds `splice_config.json` (method, config, fingerprints of the
base tensors the adapter touches), which other tools ignore and splice uses to refuse an adapter made for another
base.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from splice.errors import SpliceError, closest

PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."  # tensors a method shares across modules: base_model.vera_A
LORA_KEYS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
             "lora_magnitude_vector.weight")
CONFIG_FILE, WEIGHTS_FILE, SPLICE_FILE = "adapter_config.json", "adapter_model.safetensors", "splice_config.json"
BIN_WEIGHTS_FILE = "adapter_model.bin"


@dataclass
class AdapterFolder:
    """A parsed adapter folder: its config and tensors grouped by module path (without PEFT's prefix).

    The method owns its part of the format: `config.peft_type` / `fields_from_peft` / `to_peft` translate
    adapter_config.json, and its adapter class names its tensors (`peft_keys`) and their shapes (`peft_shapes`).
    """

    path: Path
    config: Any  # the method's config (LoraConfig, IA3Config, ...)
    peft_config: dict[str, Any]
    modules: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module → {"lora_A.weight": ..}
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # modules_to_save module → its state
    biases: dict[str, Tensor] = field(default_factory=dict)  # module → trained bias
    shared: dict[str, Tensor] = field(default_factory=dict)  # tensors shared by all modules ("vera_A")
    # module → the base weight PEFT saved beside the adapter (`save_embedding_layers`, the default for a targeted
    # embed_tokens / lm_head): checked against the base the folder is loaded into (`check_saved_base`).
    base_weights: dict[str, Tensor] = field(default_factory=dict)
    fingerprint: dict[str, str] = field(default_factory=dict)

    @property
    def lora(self) -> dict[str, dict[str, Tensor]]:
        """The per-module tensors under the name LoRA-only callers (apply, LoRA merges) know them by."""
        return self.modules

    def rank(self, module: str) -> int:
        t = self.modules[module]
        return (t.get("lora_A.weight", t.get("lora_embedding_A"))).shape[0]

    def module_config(self, module: str):
        """The config of one module: the method applies PEFT's per-module patterns (rank_pattern, alpha_pattern)."""
        return self.config.for_module(module, self.modules[module], self.peft_config)


def read_adapter_folder(path: str | Path) -> AdapterFolder:
    """Parse an adapter folder written by PEFT or splice; one-line SpliceErrors name the file at fault."""
    from splice.adapters.registry import get_method
    from splice.adapters.prompts.persist import refuse_prompt_folder
    from splice.io.checkpoints import CheckpointReader, read_json

    path = Path(path)
    if not path.is_dir():
        raise SpliceError(f"{path}: adapter folder does not exist")
    refuse_prompt_folder(path)  # prompt methods have no weight delta; splice.adapters.prompts loads them
    cfg = read_json(path / CONFIG_FILE)
    config = _config_from_peft(cfg, path / CONFIG_FILE)
    adapter_cls = get_method(config.method).adapter
    keys = tuple(adapter_cls.peft_keys)
    aliases = getattr(adapter_cls, "peft_aliases", {})
    splice_meta = read_json(path / SPLICE_FILE) if (path / SPLICE_FILE).exists() else {}
    # By name: another .safetensors beside it (a classifier head) is not the adapter. PEFT writes .bin when asked
    # (safe_serialization=False, and by default before 0.6); it loads weights-only.
    weights = next((path / n for n in (WEIGHTS_FILE, BIN_WEIGHTS_FILE) if (path / n).is_file()), None)
    if weights is None:
        raise SpliceError(f"{path}: adapter folder has no {WEIGHTS_FILE} (or {BIN_WEIGHTS_FILE})")
    reader = CheckpointReader(weights)
    folder = AdapterFolder(path, config, cfg, fingerprint=splice_meta.get("fingerprint", {}))
    saved_names = config.modules_to_save or []
    shared_keys = getattr(adapter_cls, "peft_shared_keys", ())
    for key in reader.keys():
        if key.startswith(SHARED_PREFIX) and key[len(SHARED_PREFIX):] in shared_keys:
            folder.shared[key[len(SHARED_PREFIX):]] = reader.get(key)
            continue
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        suffix = next((s for s in keys if name.endswith("." + s)), None)
        if suffix is not None:
            module = name[: -len(suffix) - 1]
            folder.modules.setdefault(module, {})[aliases.get(suffix, suffix)] = reader.get(key)
            continue
        owner = next((m for m in _prefixes(name) if any(m == s or m.endswith("." + s) for s in saved_names)), None)
        if owner is not None:
            folder.saved.setdefault(owner, {})[name[len(owner) + 1:]] = reader.get(key)
        elif name.endswith(".base_layer.weight"):
            folder.base_weights[name[: -len(".base_layer.weight")]] = reader.get(key)
        elif name.endswith(".bias") and hasattr(config, "bias"):
            # PEFT saves the trained bias of a LoRA-wrapped module under its wrapper's `base_layer`.
            module = name[: -len(".bias")].removesuffix(".base_layer")
            folder.biases[module] = reader.get(key)
        else:
            raise SpliceError(f"{weights}: tensor {key!r} is neither a {config.method} tensor, a bias, "
                              f"nor part of modules_to_save {saved_names}")
    for module, tensors in folder.modules.items():
        problem = adapter_cls.peft_missing(tensors)
        if problem:
            raise SpliceError(f"{weights}: module {module!r} has {sorted(tensors)}; {problem}")
    if folder.biases and config.bias == "none":
        config.bias = "all"  # a folder that carries trained biases was trained with bias != none
    return folder


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _config_from_peft(cfg: dict[str, Any], where: Path):
    """The registered method whose config claims this `peft_type`, built from the file's fields."""
    from splice.adapters.config import config_from_dict
    from splice.adapters.registry import METHODS

    METHODS.load()
    peft_type = cfg.get("peft_type", "LORA")
    known = sorted({m.config.peft_type for m in METHODS.values() if m.config.peft_type})
    candidates = [m for m in METHODS.values() if m.config.peft_type == peft_type]
    if peft_type is None and cfg.get("splice_method") in METHODS:  # a method PEFT does not have (BitFit)
        candidates = [METHODS[cfg["splice_method"]]]
    if not candidates:
        raise SpliceError(f"{where}: peft_type {peft_type!r} is not supported yet; splice reads {', '.join(known)}")
    method = next((m for m in candidates if m.config.claims_peft(cfg)), candidates[0])
    try:  # int()/float() of a bad value ("r": "four") must name the file, not escape as a bare ValueError
        fields = method.config.fields_from_peft(cfg)
    except (TypeError, ValueError) as err:
        raise SpliceError(f"{where}: invalid value ({err})") from None
    except SpliceError as err:
        raise SpliceError(f"{where}: {err}") from None
    try:
        return config_from_dict(method.config, fields)
    except SpliceError as err:
        raise SpliceError(f"{where}: {err}") from None


def peft_config_dict(config: Any, *, fan_in_fan_out: bool, base: str | None, r: int | None = None,
                     lora_alpha: float | None = None) -> dict[str, Any]:
    """PEFT's `adapter_config.json` for a LoRA or DoRA config."""
    target = config.target_modules
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "revision": None,
        "r": r or config.r, "lora_alpha": lora_alpha or config.lora_alpha, "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora, "use_dora": config.method == "dora", "bias": config.bias,
        "target_modules": target if isinstance(target, str) else list(target),
        "exclude_modules": config.exclude_modules, "modules_to_save": config.modules_to_save,
        "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True if config.init_lora_weights == "kaiming"
        else config.init_lora_weights if config.init_lora_weights == "gaussian" else True,
        "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "megatron_config": None, "megatron_core": "megatron.core",
        "loftq_config": {}, "layer_replication": None,
    }


def resolve_module(name: str, has: Callable[[str], bool], candidates: list[str], prefixes: list[str],
                   where: str) -> str:
    """Map an adapter's module path onto the target's naming (which may add or drop a prefix like 'bert.')."""
    if has(name):
        return name
    for p in prefixes:
        if name.startswith(p + ".") and has(name[len(p) + 1:]):
            return name[len(p) + 1:]
        if has(f"{p}.{name}"):
            return f"{p}.{name}"
    tied = ("; a base whose output head is tied to its input embedding stores only the embedding, and merging "
            "into the head would change both" if name.rsplit(".", 1)[-1] == "lm_head" else "")
    raise SpliceError(f"{where}: the adapter targets {name!r}, which the base does not have"
                      f"{closest(name, candidates)}{tied}")


def check_saved_base(folder: AdapterFolder, src: str, module: str, weight: Tensor) -> None:
    """A base weight the folder carries for module `src` (PEFT saves targeted embeddings) must be the one it is
    loaded onto: a different one (a resized vocabulary) is the folder's own base, which splice does not swap in."""
    saved = folder.base_weights.get(src)
    if saved is not None and (saved.shape != weight.shape or not torch.equal(saved.to(weight.dtype), weight)):
        raise SpliceError(f"{folder.path}: the folder carries its own base weight for {module!r} (PEFT saves "
                          f"embedding layers beside the adapter), and it differs from this base's "
                          f"{tuple(weight.shape)} one; load it onto the model it was saved from")


def module_prefixes(model: nn.Module | None = None) -> list[str]:
    """Prefixes a base may add to module names (HF heads wrap the backbone as 'bert.', 'model.', ...)."""
    out = ["model", "transformer", "bert", "roberta", "base_model"]
    prefix = getattr(model, "base_model_prefix", None)
    return [prefix, *out] if prefix else out


def scale_of(config: Any) -> float:
    return config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r)


def check_shape(tensor: Tensor, expected: tuple[int, ...], key: str, module: str, where: Path) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise SpliceError(f"{where / WEIGHTS_FILE}: tensor {key!r} of module {module!r} has shape "
                          f"{tuple(tensor.shape)} but the base needs {tuple(expected)}")


def lora_shapes(kind: str, in_f: int, out_f: int, r: int, base: Any = None) -> dict[str, tuple[int, ...]]:
    """PEFT's tensor shapes for a module of `kind`."""
    if kind == "embedding":
        return {"lora_embedding_A": (r, in_f), "lora_embedding_B": (out_f, r)}
    if kind == "conv2d":
        kh, kw = base.kernel_size
        return {"lora_A.weight": (r, in_f, kh, kw), "lora_B.weight": (out_f, r, 1, 1)}
    return {"lora_A.weight": (r, in_f), "lora_B.weight": (out_f, r)}

