"""Prompt adapters as PEFT folders: `adapter_config.json` (peft_type PROMPT_TUNING / PREFIX_TUNING / P_TUNING) and
`adapter_model.safetensors` holding one tensor, `prompt_embeddings` (n, width): the virtual tokens themselves.

As PEFT does, an encoder (prefix tuning's MLP, P-tuning's MLP/LSTM) is not saved, only what it produces, so a
loaded prompt adapter is a plain table of virtual tokens (it can still be trained further as such).
`splice_config.json` adds the method's config and a fingerprint of the base's input embeddings, so that loading
into another base fails with a clear message.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from splice.adapters.prompts.base import PromptConfig, PromptTable, container, model_dims
from splice.delta.deltaset import fingerprints_match, tensor_fingerprint
from splice.errors import SpliceError

CONFIG_FILE, WEIGHTS_FILE, SPLICE_FILE = "adapter_config.json", "adapter_model.safetensors", "splice_config.json"
KEY = "prompt_embeddings"


def _methods() -> dict[str, type]:
    """peft_type → config class of the registered prompt methods."""
    from splice.adapters.registry import METHODS, method_names

    method_names()  # loads the built-in methods
    return {m.config.peft_type: m.config for m in METHODS.values() if issubclass(m.config, PromptConfig)}


def is_prompt_folder(path: str | Path) -> bool:
    """Whether `path` holds a prompt adapter (judged by its adapter_config.json's peft_type)."""
    from splice.io.checkpoints import read_json

    file = Path(path) / CONFIG_FILE
    return file.is_file() and read_json(file).get("peft_type") in _methods()


def refuse_prompt_folder(path: str | Path) -> None:
    """For apply/merge, which need a weight delta: one line when `path` is a prompt adapter."""
    if is_prompt_folder(path):
        from splice.io.checkpoints import read_json

        cls = _methods()[read_json(Path(path) / CONFIG_FILE)["peft_type"]]
        tokens = "virtual key/value tokens" if cls.kind == "prefix" else "virtual tokens"
        raise SpliceError(f"{path}: {cls.method} adds {tokens}; it has no weight delta to merge")


def prompt_summary(path: str | Path) -> dict[str, Any]:
    """What `splice inspect` shows of a prompt adapter folder (read from its configs only)."""
    from splice.io.checkpoints import read_json

    path = Path(path)
    cfg = read_json(path / CONFIG_FILE)
    meta = read_json(path / SPLICE_FILE) if (path / SPLICE_FILE).exists() else {}
    return {"kind": "adapter", "format": "PEFT" + (" + splice" if meta else ""),
            "method": meta.get("method") or _methods()[cfg["peft_type"]].method,
            "num_virtual_tokens": cfg.get("num_virtual_tokens"), "token_dim": cfg.get("token_dim"),
            "task_type": cfg.get("task_type"), "base_model": cfg.get("base_model_name_or_path"),
            "base_fingerprinted": bool(meta.get("fingerprint"))}


def _task_type(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    can_generate = getattr(model, "can_generate", None)
    return "CAUSAL_LM" if can_generate is not None and can_generate() else "FEATURE_EXTRACTION"


def save_prompt(model: nn.Module, path: str | Path, name: str, config: PromptConfig, *, force: bool = False,
                extra: Callable[[Path], None] | None = None) -> Path:
    """Write prompt adapter `name` of `model` as a PEFT folder (atomically)."""
    from splice.io.checkpoints import atomic_output_dir, write_json

    box = container(model)
    dims = box.dims[name]
    was_training = box.training
    box.eval()  # the saved tokens are the encoder's output without dropout (P-tuning's LSTM/MLP encoder)
    try:
        with torch.no_grad():
            tokens = box.virtual_tokens(name).detach().float().cpu().contiguous().clone()
    finally:
        box.train(was_training)
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_cfg = {
        "peft_type": config.peft_type, "task_type": _task_type(model), "base_model_name_or_path": base,
        "revision": None, "inference_mode": True, "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": dims.token_dim, "num_transformer_submodules": 1,
        "num_attention_heads": dims.num_attention_heads, "num_layers": dims.num_layers, "modules_to_save": None,
        "auto_mapping": None, **config.peft_fields(dims),
    }
    meta = {"method": config.method, "config": config.to_dict(), "base": base,
            "fingerprint": _fingerprint(model)}
    with atomic_output_dir(path, force=force) as tmp:
        save_file({KEY: tokens}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, peft_cfg)
        write_json(tmp / SPLICE_FILE, meta)
        if extra is not None:
            extra(tmp)
    return Path(path)


def _fingerprint(model: nn.Module) -> dict[str, str]:
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    return {"input_embeddings": tensor_fingerprint(emb.weight)} if emb is not None else {}


def read_prompt_config(cfg: dict[str, Any], where: Path) -> PromptConfig:
    """The splice config of a PEFT prompt adapter config, keeping only the fields splice knows."""
    from splice.adapters.config import config_from_dict

    cls = _methods()[cfg["peft_type"]]
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in cfg.items() if k in names and v is not None}
    try:
        return config_from_dict(cls, fields)
    except SpliceError as err:
        raise SpliceError(f"{where}: {err}") from None


def load_prompt(model: nn.Module, path: str | Path, name: str, *, is_trainable: bool = False) -> PromptConfig:
    """Read a prompt adapter folder, check it against `model` and add it as a table (active if it is the only
    adapter; trainable only with `is_trainable`). Returns its config."""
    from splice.adapters.prompts.model import add_prompt
    from splice.io.checkpoints import CheckpointReader, read_json

    from splice.adapters.model import configs, set_adapter

    from splice.adapters.model import check_new_name

    path = Path(path)
    check_new_name(model, name)
    cfg = read_json(path / CONFIG_FILE)
    config = read_prompt_config(cfg, path / CONFIG_FILE)
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise SpliceError(f"{path / CONFIG_FILE}: num_transformer_submodules "
                          f"{cfg['num_transformer_submodules']} (encoder-decoder models) is not supported")
    dims = model_dims(model, config.kind)
    for field in ("token_dim", "num_layers", "num_attention_heads"):
        want = getattr(dims, field)
        if cfg.get(field) is not None and int(cfg[field]) != want and (field != "num_layers" or config.kind == "prefix"):
            raise SpliceError(f"{path / CONFIG_FILE}: {field} is {cfg[field]} but the base model has {want}")
    meta = read_json(path / SPLICE_FILE) if (path / SPLICE_FILE).exists() else {}
    expected = (meta.get("fingerprint") or {}).get("input_embeddings")
    if expected is not None:
        got = _fingerprint(model).get("input_embeddings")
        if got is None or not fingerprints_match(got, expected):
            raise SpliceError(f"{path}: this adapter was made for another base model: the input embeddings differ "
                              f"(fingerprint {got}, adapter expects {expected})")
    reader = CheckpointReader(path)
    keys = list(reader.keys())
    if keys != [KEY]:
        raise SpliceError(f"{path / WEIGHTS_FILE}: a {config.method} adapter holds one tensor {KEY!r}, found "
                          f"{', '.join(map(repr, keys)) or 'none'}")
    tokens = reader.get(KEY)
    width = dims.token_dim * (2 * dims.num_layers if config.kind == "prefix" else 1)
    if tuple(tokens.shape) != (config.num_virtual_tokens, width):
        raise SpliceError(f"{path / WEIGHTS_FILE}: tensor {KEY!r} has shape {tuple(tokens.shape)} but the base "
                          f"needs {(config.num_virtual_tokens, width)}")
    table = PromptTable(config.num_virtual_tokens, width)
    table.embedding.weight.data.copy_(tokens)
    add_prompt(model, config, name, table)
    configs(model)[name] = config
    if len(configs(model)) == 1:
        set_adapter(model, name)
    table.requires_grad_(is_trainable)
    return config
