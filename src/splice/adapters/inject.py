"""Find the modules a config targets and wrap each in an `AdapterLayer` (once; later adapters join it)."""
from __future__ import annotations

import re

from torch import nn

from splice.adapters.config import AdapterConfig
from splice.adapters.layer import AdapterLayer
from splice.adapters.targets import model_type
from splice.errors import SpliceError, closest

try:  # GPT-2 style layers; transformers is a dependency, but keep the import local to this table
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]


def module_kind(module: nn.Module) -> str | None:
    """The kind name adapters dispatch on, or None for module types no weight method wraps."""
    if isinstance(module, AdapterLayer):
        return module.kind
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def _output_head(model: nn.Module) -> nn.Module | None:
    """The output head as the user knows it (the module an earlier adapter's layer wraps)."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if getter is not None else None
    except (NotImplementedError, AttributeError):
        return None
    return head.base if isinstance(head, AdapterLayer) else head


def _inside(name: str, modules: list[str]) -> bool:
    """Whether module `name` is one of `modules` (by suffix, as PEFT matches them) or sits inside one."""
    return any(re.fullmatch(rf"(.*\.)?{re.escape(m)}(\..*)?", name) for m in modules)


def _matches(name: str, pattern: list[str] | str | None) -> bool:
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def plain_modules(model: nn.Module):
    """(name, module) pairs of the model as the user knows it: an AdapterLayer stands for the module it wraps."""
    inside: list[str] = []
    for name, module in model.named_modules():  # pre-order: a layer comes before its children
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, AdapterLayer):
            inside.append(name + ".")
        yield name, module


def _wrappable_leaves(model: nn.Module) -> list[str]:
    """The last name parts of the modules an adapter can wrap, for error messages."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in plain_modules(model) if n and module_kind(m)})


def resolve_targets(model: nn.Module, config: AdapterConfig) -> None:
    """Fill in the config's unset architecture fields (`target_modules`; IA3's `feedforward_modules`) from
    `model`'s architecture (recorded on the config, and derived again when the config is used on another model),
    or refuse in one line naming the modules there are."""
    unset = {f for f in config.architecture_fields if getattr(config, f) is None or f in config._from_run}
    if not unset:
        return
    found = config.architecture_defaults(model_type(model), unset)
    if found is None:
        raise SpliceError(f"target_modules: not set, and splice has no default for model type "
                          f"{model_type(model)!r} ({type(model).__name__}); name the modules (wrappable: "
                          f"{', '.join(_wrappable_leaves(model)[:20])}) or use 'all-linear'")
    for name, value in found.items():
        setattr(config, name, value)
    config._from_run = set(config._from_run) | set(found)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module, str]]:
    """(name, module, kind) for each module `config.target_modules` selects, or a SpliceError naming close names.
    An unset target_modules is first filled in from the architecture (`resolve_targets`)."""
    resolve_targets(model, config)
    head = _output_head(model)
    saved = list(getattr(config, "modules_to_save", None) or [])
    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear"
    found = []
    for name, module in plain_modules(model):
        if not name:
            continue
        kind = module_kind(module)
        if all_linear:
            plain = module.base if isinstance(module, AdapterLayer) else module
            hit = kind in ("linear", "conv1d") and plain is not head
        else:
            hit = _matches(name, config.target_modules)
        # A module saved whole (modules_to_save) is trained whole: PEFT wraps nothing in or under it either.
        if hit and not _matches(name, config.exclude_modules) and not _inside(name, saved):
            if kind is None and config.wraps_any_module:
                kind = "module"
            if kind is None:
                raise SpliceError(f"target_modules: {config.method} cannot wrap {type(module).__name__} {name!r}; "
                                  "it wraps nn.Linear, HF Conv1D, nn.Embedding and nn.Conv2d")
            found.append((name, module, kind))
    if not found:
        wanted = config.target_modules
        leaves = _wrappable_leaves(model)
        probe = wanted if isinstance(wanted, str) else wanted[0]
        raise SpliceError(f"target_modules {wanted!r} matched no module of {type(model).__name__}"
                          f"{closest(probe.rsplit('.', 1)[-1], leaves)}; wrappable modules: {', '.join(leaves[:20])}")
    return found


def wrap(model: nn.Module, name: str, module: nn.Module, kind: str) -> AdapterLayer:
    """Replace `name` in `model` by an AdapterLayer around it (or return the existing one)."""
    if isinstance(module, AdapterLayer):
        return module
    layer = AdapterLayer(module, kind)
    # A new nn.Module starts in training mode; follow the wrapped module's mode instead, so that adapting or
    # loading into an eval-mode model does not switch adapter dropout on (base's own submodules are left as they are).
    layer.training = layer.adapters.training = module.training
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return layer


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """Every AdapterLayer with its module name as the user knows it."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
