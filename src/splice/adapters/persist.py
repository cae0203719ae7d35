"""Save an adapter of a model as a PEFT folder, and load PEFT (or splice) folders into a model."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor, nn

from splice.adapters.extras import BiasShift, FullCopy
from splice.adapters.inits import saved_patterns
from splice.adapters.inject import adapter_layers, module_kind, plain_modules, wrap
from splice.adapters.model import check_new_name, configs, set_adapter
from splice.adapters.config import AdapterConfig
from splice.adapters.registry import Method, get_method
from splice.adapters.prompts.model import is_prompt_config
from splice.adapters.prompts.persist import is_prompt_folder, load_prompt, save_prompt
from splice.delta.deltaset import fingerprints_match, tensor_fingerprint
from splice.errors import SpliceError
from splice.io.checkpoints import atomic_output_dir, write_json
from splice.io.peft_format import (CONFIG_FILE, PREFIX, SHARED_PREFIX, SPLICE_FILE, WEIGHTS_FILE, check_saved_base,
                                   check_shape, module_prefixes, read_adapter_folder, resolve_module)


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default", *, force: bool = False,
                 extra: Callable[[Path], None] | None = None) -> Path:
    """Write adapter `adapter_name` of `model` as a PEFT folder (atomically; `force` replaces an existing one).

    `extra`, when given, is called with the temporary folder to add files of its own (a classifier head) before
    the folder is renamed into place, so that they too appear all at once or not at all.

    Returns:
        The folder path.
    """
    config = configs(model).get(adapter_name)
    if config is None:
        raise SpliceError(f"no adapter named {adapter_name!r} on this model; it has: {', '.join(configs(model))}")
    if is_prompt_config(config):
        return save_prompt(model, path, adapter_name, config, force=force, extra=extra)
    if any(adapter_name in layer.merged for _, layer in adapter_layers(model)):
        # Merged, the base weights include it: the fingerprints (and trained biases, saved as base + shift) would
        # describe the merged weights, and the folder would then be refused by, or wrong on, the real base.
        raise SpliceError(f"adapter {adapter_name!r} is merged into the base; unmerge it before saving")
    tensors: dict[str, Tensor] = {}
    fingerprint: dict[str, str] = {}
    kinds, adapters = set(), []
    for name, layer in adapter_layers(model):
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if adapter is None:
            continue
        kinds.add(layer.kind)
        adapters.append(adapter)
        for key, t in getattr(adapter, "peft_shared", dict)().items():  # once, however many modules share it
            tensors.setdefault(f"{SHARED_PREFIX}{key}", t.detach().contiguous().clone())
        for key, t in adapter.peft_state(layer.base).items():
            tensors[f"{PREFIX}{name}.{key}"] = t.detach().contiguous().clone()
        if isinstance(getattr(layer.base, "weight", None), Tensor):
            fingerprint[f"{name}.weight"] = tensor_fingerprint(layer.base.weight)
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_cfg = config.to_peft(base=base, kinds=kinds, adapters=adapters)
    peft_cfg.update(saved_patterns(model, adapter_name, config))  # per-layer ranks chosen by an init (eva)
    with atomic_output_dir(path, force=force) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, peft_cfg)
        write_json(tmp / SPLICE_FILE, {"method": config.method, "config": config.to_dict(), "base": base,
                                       "fingerprint": fingerprint})
        if extra is not None:
            extra(tmp)
    return Path(path)


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default", *,
                 is_trainable: bool = False) -> nn.Module:
    """Load a PEFT or splice adapter folder into `model` as adapter `adapter_name`.

    Shapes are checked against the model, and when the folder records fingerprints of the base tensors it was
    trained on (splice_config.json), a different base is refused. The adapter becomes active if it is the only one.
    """
    path = Path(path)
    if is_prompt_folder(path):
        load_prompt(model, path, adapter_name, is_trainable=is_trainable)
        return model
    folder = read_adapter_folder(path)
    check_new_name(model, adapter_name)
    modules = dict(plain_modules(model))
    names = [n for n in modules if n]
    prefixes = module_prefixes(model)
    where = str(path / WEIGHTS_FILE)
    method = get_method(folder.config.method)
    built: list[tuple[str, nn.Module, str, nn.Module, dict[str, Tensor]]] = []
    targets = []
    for src, tensors in folder.modules.items():
        name = resolve_module(src, modules.__contains__, names, prefixes, where)
        module = modules[name]
        kind = module_kind(module) or ("module" if folder.config.wraps_any_module else None)
        base = module.base if hasattr(module, "adapters") else module
        if kind is None:
            raise SpliceError(f"{where}: module {name!r} is a {type(base).__name__}, which {method.name} cannot wrap")
        if isinstance(getattr(base, "weight", None), Tensor):
            check_saved_base(folder, src, name, base.weight.detach())
        targets.append((src, name, module, base, kind, tensors))
    try:
        prepared = folder.config.prepare([(n, b, k) for _, n, _, b, k, _ in targets], folder.shared)
    except SpliceError as err:
        raise SpliceError(f"{where}: {err}") from None
    for src, name, module, base, kind, tensors in targets:
        config = prepared.for_module(src, tensors, folder.peft_config).for_target(name)
        check_module_tensors(method, base, kind, config, tensors, name, path)
        _check_fingerprint(folder.fingerprint.get(f"{src}.weight"), base, name, path)
        adapter = method.adapter(base, kind, config)
        bias = folder.biases.pop(src, None)
        built.append((name, module, kind, adapter, {**tensors, **({"bias": bias} if bias is not None else {})}))
    for src, state in folder.saved.items():
        name = resolve_module(src, modules.__contains__, names, prefixes, where)
        base = modules[name].base if hasattr(modules[name], "adapters") else modules[name]
        expected = {k: tuple(v.shape) for k, v in base.state_dict().items()}
        for key, tensor in state.items():  # a head of another size (num_labels) is refused here, not half-loaded
            if key not in expected:
                raise SpliceError(f"{where}: modules_to_save {name!r} has tensor {key!r}, which its "
                                  f"{type(base).__name__} does not have ({', '.join(expected)})")
            check_shape(tensor, expected[key], key, name, path)
        built.append((name, modules[name], "module", FullCopy(base), state))
    for src, bias in folder.biases.items():
        name = resolve_module(src, modules.__contains__, names, prefixes, where)
        base = modules[name].base if hasattr(modules[name], "adapters") else modules[name]
        check_shape(bias, tuple(base.bias.shape), "bias", name, path)
        built.append((name, modules[name], module_kind(base) or "module", BiasShift(base), {"bias": bias}))
    for name, module, kind, adapter, state in built:  # into the adapters alone: the model is not touched yet
        adapter.load_peft_state(state, module.base if hasattr(module, "adapters") else module)
    # Freeze the base only now that every check passed: a refused load leaves the model as it was.
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module, kind, adapter, _ in built:
        wrap(model, name, module, kind).add(adapter_name, adapter)
    configs(model)[adapter_name] = folder.config
    if len(configs(model)) == 1:
        set_adapter(model, adapter_name)
    for _, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            layer.adapters[adapter_name].requires_grad_(is_trainable)
    return model


def check_module_tensors(method: Method, base: nn.Module, kind: str, config: AdapterConfig,
                         tensors: dict[str, Tensor], name: str, path: Path) -> None:
    """The folder's tensors for module `name` are exactly those `method` uses on `base`, with its shapes."""
    try:
        expected = method.adapter.peft_shapes(base, kind, config)
    except (AttributeError, TypeError):  # a module this method does not know (OFT's Conv2d in a PEFT folder)
        raise SpliceError(f"{path}: module {name!r} is a {type(base).__name__}, which splice's {method.name} cannot "
                          "wrap") from None
    for key in tensors:
        if key not in expected:
            raise SpliceError(f"{path / WEIGHTS_FILE}: module {name!r} has tensor {key!r}, which {method.name} does "
                              f"not use on a {type(base).__name__} (expected {', '.join(expected)})")
    for key, shape in expected.items():
        if key not in tensors:
            raise SpliceError(f"{path / WEIGHTS_FILE}: module {name!r} lacks tensor {key!r}")
        check_shape(tensors[key], shape, key, name, path)
    # A method may check values too (positions inside the weight), so that a refused load touches nothing.
    problem = getattr(method.adapter, "peft_problem", lambda *a: None)(tensors, base, kind, config)
    if problem:
        raise SpliceError(f"{path / WEIGHTS_FILE}: module {name!r}: {problem}")


def _check_fingerprint(expected: str | None, base: nn.Module, name: str, path: Path) -> None:
    if expected is None:
        return
    got = tensor_fingerprint(base.weight)
    if not fingerprints_match(got, expected):
        raise SpliceError(f"{path}: this adapter was made for another base model: tensor {name}.weight differs "
                          f"(fingerprint {got}, adapter expects {expected})")


__all__ = ["save_adapter", "load_adapter"]
