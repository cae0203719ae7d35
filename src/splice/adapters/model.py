"""Adapters on a whole model: add, switch, disable, merge/unmerge, delete, mixed batches, deltas.

The model stays the user's own `nn.Module` (an HF model stays an HF model): `adapt` wraps the targeted modules in
place and records each adapter's config on the model object itself (`model.splice_adapters`), never in global
state. `AdaptedModel(model)` is a thin handle that gathers the operations below as methods.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, not_a_delta
from splice.adapters.extras import BiasShift, FullCopy
from splice.adapters.inits import data_init
from splice.adapters.inject import adapter_layers, find_targets, module_kind, plain_modules, wrap
from splice.adapters.layer import AdapterLayer
from splice.adapters.prompts.model import (add_prompt, delete_prompt, is_active_prompt, is_prompt_config,
                                           prompt_names, prompt_parameters, refuse_prompt,
                                           refuse_prompts_in_mixed_batch, set_active_prompt, set_prompts_disabled)
from splice.adapters.registry import get_method
from splice.delta.deltaset import DeltaSet
from splice.errors import SpliceError, closest

ATTR = "splice_adapters"


def configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """Adapter name → config for every adapter on `model`."""
    return model.__dict__.setdefault(ATTR, {})


def _check_name(model: nn.Module, name: str) -> None:
    if name not in configs(model):
        raise SpliceError(f"no adapter named {name!r}{closest(name, configs(model))}; "
                          f"this model has: {', '.join(configs(model)) or 'none'}")


def check_new_name(model: nn.Module, adapter_name: str) -> None:
    """One line before anything changes: a name already taken, or one a module dictionary cannot hold."""
    if adapter_name in configs(model):
        raise SpliceError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
    if not adapter_name or "/" in adapter_name or "." in adapter_name:
        raise SpliceError(f"adapter name {adapter_name!r}: use letters, digits, '-' and '_' only")


def adapt(model: nn.Module, config: AdapterConfig, adapter_name: str = "default", *, init: bool = True,
          calibration: Iterable[Any] | None = None, calibration_loss: Callable[[Any], Tensor] | None = None
          ) -> nn.Module:
    """Inject adapter `adapter_name` of `config`'s method into `model` and make it the active, trainable one.

    Args:
        model: any `nn.Module`, usually a transformers model; it is modified in place and returned.
        config: a method config, e.g. `LoraConfig(r=8, target_modules=["query", "value"])`.
        adapter_name: name of the new adapter; a model can hold many.
        init: False leaves the freshly built weights for a loader to overwrite (skips nothing else).
        calibration: a few batches of model inputs (dicts for `model(**batch)`) for the data-driven starts
            (LoRA's `init_lora_weights` eva, lora_ga, corda; LoRA-SB), run once through the base model; a config's
            `needs_calibration` says whether it uses them.
        calibration_loss: batch → loss, to run batches that are not dicts of model inputs.
    Returns:
        The same model, with every base parameter frozen.
    """
    if not isinstance(config, AdapterConfig) and not is_prompt_config(config):
        raise SpliceError(f"config must be an adapter config such as LoraConfig, got {type(config).__name__}")
    check_new_name(model, adapter_name)
    if is_prompt_config(config):  # virtual tokens, not wrapped modules: see splice.adapters.prompts
        add_prompt(model, config, adapter_name)
        configs(model)[adapter_name] = config
        set_adapter(model, adapter_name)
        return model
    method = get_method(config.method)
    targets = find_targets(model, config)
    saved = _modules_to_save(model, config)
    # Build every adapter before touching the model: a method may refuse a module (DoRA on an embedding), and a
    # refusal half-way must not leave some modules wrapped and the base frozen.
    plain = [(name, module.base if isinstance(module, AdapterLayer) else module, kind)
             for name, module, kind in targets]
    prepared = config.prepare(plain, None)  # state shared by all modules (VeRA's projections), made once
    built = [(name, module, kind, method.adapter(base, kind, prepared.for_target(name)))
             for (name, module, kind), (_, base, _) in zip(targets, plain)]
    with disable_adapters(model) if calibration is not None else contextlib.nullcontext():  # calibrate the base
        built = data_init(model, config, built, calibration, calibration_loss, method.adapter)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module, kind, adapter in built:
        wrap(model, name, module, kind).add(adapter_name, adapter)
    for name, module in saved:
        layer = wrap(model, name, module, "module")
        layer.add(adapter_name, FullCopy(layer.base))
    if getattr(config, "bias", "none") == "all":
        wrapped = {n for n, _, _ in targets} | {n for n, _ in saved}
        for name, module in list(plain_modules(model)):
            # A module already wrapped for another adapter still gets this adapter's bias (look at its base).
            plain = module.base if isinstance(module, AdapterLayer) else module
            if name and name not in wrapped and isinstance(getattr(plain, "bias", None), torch.Tensor):
                layer = wrap(model, name, module, module_kind(plain) or "module")
                layer.add(adapter_name, BiasShift(layer.base))
    configs(model)[adapter_name] = config
    set_adapter(model, adapter_name)
    return model


def _modules_to_save(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    if not config.modules_to_save:
        return []
    found = [(n, m) for n, m in plain_modules(model)
             if n and any(n == t or n.endswith("." + t) for t in config.modules_to_save)]
    if not found:
        names = [n.rsplit(".", 1)[-1] for n, _ in plain_modules(model) if n]
        raise SpliceError(f"modules_to_save {config.modules_to_save!r} matched no module"
                          f"{closest(config.modules_to_save[0], set(names))}")
    return found


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters (their contributions add up) and the only trainable ones."""
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        _check_name(model, n)
    set_active_prompt(model, names)
    for _, layer in adapter_layers(model):
        layer.active = [n for n in names if n in layer.adapters]
        for n, adapter in layer.adapters.items():
            adapter.requires_grad_(n in names)


def active_adapters(model: nn.Module) -> list[str]:
    return [n for n in configs(model)
            if any(n in layer.active for _, layer in adapter_layers(model)) or is_active_prompt(model, n)]


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block (merged adapters must be unmerged first)."""
    layers = [layer for _, layer in adapter_layers(model)]
    if any(layer.merged for layer in layers):
        raise SpliceError("cannot disable adapters while one is merged into the base; unmerge it first")
    for layer in layers:
        layer.disabled = True
    set_prompts_disabled(model, True)
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False
        set_prompts_disabled(model, False)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, row_adapters: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, row i of every batch runs with adapter `row_adapters[i]` (None: the base alone).

    The base runs once for the whole batch; each adapter's contribution is computed on its own rows only
    (sorting a batch by adapter makes every group a contiguous slice, which needs no gather at all).
    """
    refuse_prompts_in_mixed_batch(model, row_adapters)
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(row_adapters):
        if n is not None:
            _check_name(model, n)
            groups.setdefault(n, []).append(i)
    layers = [layer for _, layer in adapter_layers(model)]
    if any(layer.merged for layer in layers):  # a merged adapter would reach every row, None rows included
        raise SpliceError("cannot run a mixed batch while an adapter is merged into the base; unmerge it first")
    device = next(model.parameters()).device
    index = [(n, slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] == len(rows) - 1
              else torch.tensor(rows, dtype=torch.long, device=device)) for n, rows in groups.items()]
    outer = [(layer.row_groups, layer.row_count) for layer in layers]  # a block inside another gives them back
    for layer in layers:
        layer.row_groups, layer.row_count = index, len(row_adapters)
    try:
        yield
    finally:
        for layer, (groups_before, count_before) in zip(layers, outer):
            layer.row_groups, layer.row_count = groups_before, count_before


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter `name` into the base weights; the forward then skips it. `unmerge_adapter` undoes it."""
    _check_name(model, name)
    refuse_prompt(model, name, configs(model)[name])
    refuse_without_delta(model, name, "merged")
    _refuse_tied(model, name)
    if any(layer.row_groups is not None for _, layer in adapter_layers(model)):  # it would reach every row
        raise SpliceError(f"cannot merge adapter {name!r} inside a mixed_batch block; merge before or after it")
    for _, layer in adapter_layers(model):
        layer.merge(name)


def _refuse_tied(model: nn.Module, name: str) -> None:
    """One line when adapter `name` would be merged into a weight another module shares (tied input and output
    embeddings): the merge would change that module too, which the unmerged adapter never did."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(p.data_ptr(), []).append(pname)
    for path, layer in adapter_layers(model):
        weight = getattr(layer.base, "weight", None)
        if name not in layer.adapters or name in layer.merged or not isinstance(weight, Tensor):
            continue
        others = [n for n in owners.get(weight.data_ptr(), []) if not n.startswith(path + ".")]
        if others:
            raise SpliceError(f"adapter {name!r} cannot be merged: {path}.weight is tied to {others[0]}, which the "
                              f"merge would change too; untie them first (give one its own copy: "
                              f"`m.weight = nn.Parameter(m.weight.detach().clone())`)")


def refuse_without_delta(model: nn.Module, name: str, action: str) -> None:
    """One line, before any module is touched, when adapter `name` (or one of its modules) has no weight delta:
    a method that is not a delta (`has_delta` False: bottleneck adapters), or a module that says why it cannot be
    merged (`merge_refusal(base)`: SSF's shift on a module without a bias)."""
    config = configs(model)[name]
    if not getattr(config, "has_delta", True):
        raise not_a_delta(config.method, action)
    for path, layer in adapter_layers(model):
        check = getattr(layer.adapters[name], "merge_refusal", None) if name in layer.adapters else None
        reason = check(layer.base) if check is not None and name not in layer.merged else None
        if reason:
            raise SpliceError(f"adapter {name!r} cannot be {action}: module {path!r} {reason}")


def unmerge_adapter(model: nn.Module, name: str) -> None:
    _check_name(model, name)
    refuse_prompt(model, name, configs(model)[name])
    for _, layer in adapter_layers(model):
        layer.unmerge(name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; a module left with no adapter is restored to the original module."""
    _check_name(model, name)
    delete_prompt(model, name)
    for path, layer in adapter_layers(model):
        if name in layer.adapters:
            layer.delete(name)
        if not layer.adapters:
            _replace(model, path, layer.base)
    del configs(model)[name]


def merge_and_unload(model: nn.Module, name: str | None = None) -> nn.Module:
    """Merge adapter `name` (default: the only one) into the base and remove every adapter layer."""
    if name is None:
        if len(configs(model)) != 1:
            raise SpliceError(f"merge_and_unload: name the adapter to merge, one of {', '.join(configs(model))}")
        name = next(iter(configs(model)))
    merge_adapter(model, name)
    for path, layer in adapter_layers(model):
        _replace(model, path, layer.base)
    for prompt in prompt_names(model):
        delete_prompt(model, prompt)
    configs(model).clear()
    return model


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def trainable_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """Parameters of adapter `name` (default: all active adapters)."""
    names = [name] if name else active_adapters(model)
    params = [p for _, layer in adapter_layers(model) for n in names if n in layer.adapters
              for p in layer.adapters[n].parameters()] + prompt_parameters(model, names)
    # A tensor shared by every module of an adapter (Compacter's A_i) is listed once: an optimizer given it
    # twice would step it twice, and a parameter count would count it per module.
    return list({id(p): p for p in params}.values())


def get_delta(model: nn.Module, name: str = "default") -> DeltaSet:
    """Adapter `name` as a DeltaSet keyed by the base model's own parameter names ('…query.weight')."""
    _check_name(model, name)
    refuse_prompt(model, name, configs(model)[name], "return")
    refuse_without_delta(model, name, "returned as a delta")
    if any(name in layer.merged for _, layer in adapter_layers(model)):
        # DoRA's and modules_to_save's deltas are measured against the base weights, which now include them.
        raise SpliceError(f"adapter {name!r} is merged into the base; unmerge it before taking its delta")
    deltas = {}
    for path, layer in adapter_layers(model):
        if name in layer.adapters:
            for pname, d in layer.adapters[name].delta(layer.base).items():
                deltas[f"{path}.{pname}"] = d
    config = configs(model)[name]
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return DeltaSet(deltas, base=base, method=config.method, config=config.to_dict())


class AdaptedModel:
    """A handle on an adapted model gathering the functions of this module as methods."""

    def __init__(self, model: nn.Module):
        self.model = model

    def add(self, config: AdapterConfig, name: str = "default") -> "AdaptedModel":
        adapt(self.model, config, name)
        return self

    def set_active(self, names: str | Sequence[str]) -> None:
        set_adapter(self.model, names)

    def disabled(self):
        return disable_adapters(self.model)

    def mixed_batch(self, row_adapters: Sequence[str | None]):
        return mixed_batch(self.model, row_adapters)

    def merge(self, name: str) -> None:
        merge_adapter(self.model, name)

    def unmerge(self, name: str) -> None:
        unmerge_adapter(self.model, name)

    def delete(self, name: str) -> None:
        delete_adapter(self.model, name)

    def delta(self, name: str = "default") -> DeltaSet:
        return get_delta(self.model, name)

    @property
    def adapters(self) -> list[str]:
        return list(configs(self.model))
