"""Build a server from a model folder and an adapter folder: what `splice serve` runs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from splice.errors import SpliceError
from splice.io.models import load_model, resolve_model
from splice.serve.engine import Engine
from splice.serve.http import ServeLimits, create_app
from splice.serve.pool import AdapterPool


def model_kind(name_or_path: str) -> str:
    """'causal-lm' when the model's config names a *ForCausalLM architecture, else 'encoder'."""
    where = Path(resolve_model(name_or_path))
    config = where / "config.json"
    if not config.is_file():
        raise SpliceError(f"model {name_or_path}: no config.json to tell a causal LM from an encoder; pass --kind")
    archs = json.loads(config.read_text()).get("architectures") or []
    return "causal-lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "encoder"


def build_app(base: str, adapters: str | Path | None = None, *, adapter_paths: dict[str, str] | None = None,
              kind: str = "auto", model_name: str | None = None, api_key: str | None = None,
              max_adapter_bytes: int = 1 << 30, max_batch: int = 32, limits: ServeLimits | None = None,
              mixed: bool = True) -> Any:
    """Load `base` and return the FastAPI app serving it with the adapters of folder `adapters`.

    Args:
        base: a model folder, hub id, or 'default'.
        adapters: a folder with one adapter folder per name (loaded on first use).
        adapter_paths: more adapters, name → folder.
        kind: 'causal-lm', 'encoder', or 'auto' (from the model's config).
        model_name: the id of the base model in the API (default: the folder's name).
        api_key: require `Authorization: Bearer <api_key>`.
        max_adapter_bytes: memory for resident adapters; least recently used ones are evicted beyond it.
        max_batch: most rows decoded at once.
        limits: request bounds.
        mixed: False serves one adapter per batch (the PEFT-style baseline, for benchmarks).
    """
    kind = model_kind(base) if kind == "auto" else kind
    model, tokenizer = load_model(base, kind)
    pool = AdapterPool(model, adapters, paths=adapter_paths, max_bytes=max_adapter_bytes)
    engine = Engine(model, pool, kind, max_batch=max_batch, mixed=mixed)
    name = model_name or Path(resolve_model(base)).name
    return create_app(engine, tokenizer, model_name=name, api_key=api_key, limits=limits)
