"""Prompt adapters on a whole model: add, activate, disable, delete, their parameters, and the refusals.

`splice.adapters.model` calls these at the top of its public functions, so one API covers weight adapters and
prompt adapters alike; each function here is a no-op on a model without prompt adapters.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

from torch import nn

from splice.adapters.prompts.base import PromptConfig, container, model_dims, remove_container
from splice.adapters.registry import get_method
from splice.errors import SpliceError


def cache_argument(model: nn.Module) -> str | None:
    """The name the model's forward takes a KV cache under (transformers 5 renamed past_key_values to cache)."""
    params = inspect.signature(model.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def is_prompt_config(config: object) -> bool:
    return isinstance(config, PromptConfig)


def prompt_names(model: nn.Module) -> list[str]:
    box = container(model)
    return list(box.encoders) if box is not None else []


def add_prompt(model: nn.Module, config: PromptConfig, name: str, encoder: nn.Module | None = None) -> None:
    """Add prompt adapter `name` (a fresh encoder of `config`'s method, or `encoder` as loaded) and freeze the base.

    Everything is checked before the model is touched, so a refusal leaves it as it was.
    """
    dims = model_dims(model, config.kind)
    if config.kind == "prefix" and cache_argument(model) is None:
        raise SpliceError(f"{config.method} needs a model that takes a KV cache (past_key_values); "
                          f"{type(model).__name__} does not")
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if config.kind == "embeds" and embeddings is None:
        raise SpliceError(f"{config.method} needs the model's input embeddings; {type(model).__name__} has no "
                          "get_input_embeddings()")
    if encoder is None:
        encoder = get_method(config.method).adapter(dims, config, embeddings)
    ref = next(model.parameters())
    encoder = encoder.to(ref.device)
    encoder.train(model.training)
    for p in model.parameters():
        p.requires_grad_(False)
    box = container(model, create=True)
    box.cache_argument = cache_argument(model)
    box.train(model.training)
    box.encoders[name] = encoder
    box.kinds[name], box.dims[name] = config.kind, dims


def set_active_prompt(model: nn.Module, names: Sequence[str]) -> None:
    """Make the prompt adapter among `names` (at most one) active and trainable; the others frozen."""
    box = container(model)
    if box is None:
        return
    chosen = [n for n in names if n in box.encoders]
    if len(chosen) > 1:
        raise SpliceError(f"prompt adapters {', '.join(chosen)}: only one prompt adapter can be active at a time")
    box.active = chosen[0] if chosen else None
    for n, encoder in box.encoders.items():
        encoder.requires_grad_(n == box.active)


def is_active_prompt(model: nn.Module, name: str) -> bool:
    box = container(model)
    return box is not None and box.active == name


def set_prompts_disabled(model: nn.Module, disabled: bool) -> None:
    box = container(model)
    if box is not None:
        box.disabled = disabled


def refuse_prompt(model: nn.Module, name: str, config: object, what: str = "merge") -> None:
    """One line for an operation that needs a weight delta, asked of a prompt adapter."""
    if name in prompt_names(model):
        tokens = "virtual key/value tokens" if getattr(config, "kind", "") == "prefix" else "virtual tokens"
        raise SpliceError(f"{config.method} adds {tokens}; it has no weight delta to {what}")


def refuse_prompts_in_mixed_batch(model: nn.Module, row_adapters: Sequence[str | None]) -> None:
    box = container(model)
    if box is None:
        return
    if box.active is not None or any(n in box.encoders for n in row_adapters if n is not None):
        raise SpliceError("mixed batches run weight adapters per row; prompt adapters change the sequence of every "
                          "row and cannot take part (deactivate them with set_adapter first)")


def delete_prompt(model: nn.Module, name: str) -> None:
    box = container(model)
    if box is None or name not in box.encoders:
        return
    del box.encoders[name]
    box.kinds.pop(name), box.dims.pop(name)
    if box.active == name:
        box.active = None
    if not box.encoders:
        remove_container(model)


def prompt_parameters(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    box = container(model)
    if box is None:
        return []
    return [p for n in names if n in box.encoders for p in box.encoders[n].parameters()]
