"""`splice inspect`: what an adapter folder or a model folder holds, read from headers (no tensor data)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from splice.errors import SpliceError
from splice.io.checkpoints import CheckpointReader, read_json
from splice.io.peft_format import CONFIG_FILE, PREFIX, SPLICE_FILE


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _shards(path: Path) -> int:
    index = path / "model.safetensors.index.json"
    return len(set(read_json(index).get("weight_map", {}).values())) if index.exists() else 1


def _method_keys(cfg: dict[str, Any], path: Path) -> tuple[str, ...]:
    """The per-module tensor names of the folder's method (LoRA's when the method is not known)."""
    from splice.adapters.registry import get_method
    from splice.io.peft_format import _config_from_peft

    try:
        return tuple(get_method(_config_from_peft(cfg, path / CONFIG_FILE).method).adapter.peft_keys)
    except SpliceError:
        return ("lora_A.weight", "lora_embedding_A")


def inspect_path(path: str | Path) -> dict[str, Any]:
    """A summary of an adapter folder (PEFT or splice) or a model folder / checkpoint."""
    path = Path(path)
    if not path.exists():
        raise SpliceError(f"{path}: no such file or folder")
    from splice.compress.storage import DELTA_CONFIG, DELTA_WEIGHTS, is_compressed

    compressed = path.is_dir() and is_compressed(path)
    reader = CheckpointReader(path / DELTA_WEIGHTS if compressed else path)
    names = reader.keys()
    sizes = {n: _numel(reader.shape(n)) * reader.dtype(n).itemsize for n in names}
    params = sum(_numel(reader.shape(n)) for n in names)
    dtypes = Counter(str(reader.dtype(n)).replace("torch.", "") for n in names)
    info: dict[str, Any] = {"path": str(path), "tensors": len(names), "parameters": params,
                            "bytes": sum(sizes.values()), "dtypes": dict(dtypes)}
    from splice.adapters.prompts.persist import is_prompt_folder, prompt_summary

    if compressed:  # `splice compress` output: per tensor, its form (dense / lowrank) and its parts' encodings
        cfg = read_json(path / DELTA_CONFIG)
        entries = cfg.get("tensors") if isinstance(cfg.get("tensors"), dict) else {}
        parts = [p for e in entries.values() if isinstance(e, dict) for p in (e.get("parts") or {}).values()
                 if isinstance(p, dict)]
        info.update({
            "kind": "compressed delta",
            "format": cfg.get("format"),
            "method": cfg.get("method"),
            "updated_tensors": len(entries),
            "forms": dict(Counter(e.get("kind", "?") for e in entries.values() if isinstance(e, dict))),
            "bits": sorted({p["bits"] for p in parts if p.get("bits") is not None}),
            "sparse_parts": sum(p.get("index", "none") != "none" for p in parts),
            "base_model": cfg.get("base_model"),
            "base_fingerprinted": bool(cfg.get("fingerprint")),
        })
    elif path.is_dir() and is_prompt_folder(path):  # virtual tokens: no rank, no wrapped modules
        info.update(prompt_summary(path))
    elif path.is_dir() and (path / CONFIG_FILE).exists():
        cfg = read_json(path / CONFIG_FILE)
        splice_cfg = read_json(path / SPLICE_FILE) if (path / SPLICE_FILE).exists() else {}
        keys = _method_keys(cfg, path)  # the method's own tensor names ("lora_A.weight", "ia3_l", ...)
        modules = sorted({n[len(PREFIX):] if n.startswith(PREFIX) else n for n in names})
        modules = sorted({m[: -len(k) - 1] for m in modules for k in keys if m.endswith("." + k)})
        leaves = Counter(m.rsplit(".", 1)[-1] for m in modules)
        ranks = sorted({reader.shape(n)[0] for n in names if n.endswith(("lora_A.weight", "lora_embedding_A"))})
        ranks = ranks or ([cfg["r"]] if "r" in cfg else [])
        info.update({
            "kind": "adapter",
            "format": "PEFT" + (" + splice" if splice_cfg else ""),
            "method": splice_cfg.get("method") or ("dora" if cfg.get("use_dora") else cfg.get("peft_type", "?").lower()),
            "rank": ranks[0] if len(ranks) == 1 else ranks,
            "alpha": cfg.get("lora_alpha", cfg.get("alpha")),
            "rslora": cfg.get("use_rslora", False),
            "target_modules": cfg.get("target_modules"),
            "wrapped_modules": len(modules),
            "wrapped_by_name": dict(leaves),
            "modules_to_save": cfg.get("modules_to_save"),
            "base_model": cfg.get("base_model_name_or_path"),
            "base_fingerprinted": bool(splice_cfg.get("fingerprint")),
        })
    else:
        config = read_json(path / "config.json") if path.is_dir() and (path / "config.json").exists() else {}
        info.update({
            "kind": "model",
            "architecture": (config.get("architectures") or ["?"])[0] if config else "?",
            "model_type": config.get("model_type", "?"),
            "shards": _shards(path),
            "tokenizer": any((path / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model"))
            if path.is_dir() else False,
        })
    reader.close()
    return info


def format_inspect(info: dict[str, Any]) -> str:
    """Aligned `key: value` lines, human units for sizes."""
    shown = dict(info)
    shown["bytes"] = _bytes(info["bytes"])
    shown["parameters"] = f"{info['parameters']:,}"
    width = max(len(k) for k in shown)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in shown.items())
