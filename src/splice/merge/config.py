"""The merge config: mergekit's YAML schema, validated on load, with one-line errors that name the YAML path.

    merge_method: ties
    base_model: ./llama-base
    models:
      - model: ./ft-math
        parameters: {weight: [0.2, 1.0], density: 0.5}        # weight: a gradient over the layers
      - model: ./ft-code
        parameters:
          weight: [{filter: self_attn, value: 0.3}, {value: 0.7}]   # the first matching filter wins
    parameters: {lambda: 1.0}
    dtype: bfloat16

The same fields build a `MergeConfig` from Python (``MergeConfig(merge_method="linear", models=[...])``).

A parameter value is one of (mergekit's semantics, re-implemented in `evaluate_setting`):

- a scalar: the same value for every tensor;
- a list of scalars, a *gradient*: interpolated linearly at ``t = i / (n - 1)`` for layer ``i`` of the ``n`` layers of
  its output slice (``t = 1`` when the slice has one layer; ``t = 0`` for tensors outside the layers, such as the
  embeddings); non-numeric lists pick the element at ``int(t * (len - 1))``;
- a list of ``{filter, value}`` entries: the first whose ``filter`` is a substring of the tensor name (or is
  missing / ``"*"``) gives the value (itself a scalar or a gradient); when none matches, the next scope is asked.

Scopes, most specific first: the model's own ``parameters`` (per-model parameters only), the slice's, the top level.

Accepted from mergekit but not used by splice (a note is printed): ``chat_template``, a slice's ``residual_weight``,
a model reference's ``override_architecture``. Refused with a clear error: ``modules`` (multi-module configs),
``tokenizer_source: union`` and ``tokenizer.tokens`` (vocabulary surgery), and a ``tokenizer_source`` model whose
vocabulary size differs from the merged embeddings' (mergekit would realign them; splice copies tokenizer files).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

from pydantic import (AfterValidator, BaseModel, ConfigDict, TypeAdapter, ValidationError, field_validator,
                      model_serializer, model_validator)
from typing_extensions import Annotated

from splice.errors import SpliceError, closest

__all__ = ["MergeConfig", "ModelRef", "InputModel", "InputSlice", "OutputSlice", "TokenizerConfig", "load_config",
           "evaluate_setting", "torch_dtype", "DTYPES"]

DTYPES = ("float32", "float16", "bfloat16", "float64")
# Methods that give the base no special role (mergekit's BasePolicy.IGNORED): it is merged as one more model, and
# added to the inputs when `models` does not list it, as mergekit does. A method may say so itself with a
# `base_as_input` attribute on its registry entry.
BASE_AS_INPUT = frozenset({"linear", "karcher", "passthrough"})
_SCALARS = (bool, int, float, str)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    """A model: ``"path"``, ``"path@revision"``, ``"path+lora_path"`` (a LoRA applied to that model), or mergekit's
    dict form ``{model: {path, revision}, lora: {path, revision}, override_architecture}``."""

    path: str
    revision: Optional[str] = None
    lora: Optional[str] = None
    lora_revision: Optional[str] = None
    override_architecture: Optional[str] = None  # accepted, not used: splice reads the architecture from config.json

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            if Path(value).expanduser().exists():  # a real local path is taken literally, even with '@' or '+'
                return {"path": value}
            model, _, lora = value.partition("+")
            if "+" in lora:
                raise ValueError(f"cannot parse model reference {value!r}: more than one '+'")
            out = dict(zip(("path", "revision"), _split_revision(model)))
            if lora:
                out.update(zip(("lora", "lora_revision"), _split_revision(lora)))
            return out
        if isinstance(value, dict) and "model" in value:  # mergekit's dict form
            keys = ("model", "lora", "override_architecture")
            for key in value:
                if key not in keys:
                    raise ValueError(f"unknown key {key!r} in model reference{closest(key, keys)}")
            out = _path_dict(value["model"], "model")
            if value.get("lora") is not None:
                lora = _path_dict(value["lora"], "lora")
                out.update(lora=lora["path"], lora_revision=lora.get("revision"))
            if value.get("override_architecture") is not None:
                out["override_architecture"] = value["override_architecture"]
            return out
        return value

    @model_serializer
    def _serialize(self) -> str:
        return str(self)

    def __str__(self) -> str:
        text = self.path + (f"@{self.revision}" if self.revision else "")
        if self.lora:
            text += f"+{self.lora}" + (f"@{self.lora_revision}" if self.lora_revision else "")
        return text


def _split_revision(text: str) -> tuple[str, ...]:
    if text.count("@") > 1:
        raise ValueError(f"cannot parse model reference {text!r}: more than one '@'")
    path, _, rev = text.partition("@")
    return (path, rev) if rev else (path,)


def _path_dict(value: Any, key: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"path": value}
    if isinstance(value, dict) and set(value) <= {"path", "revision"} and "path" in value:
        return dict(value)
    raise ValueError(f"{key}: expected a path string or {{path, revision}}, got {value!r}")


def _check_setting(value: Any) -> Any:
    """Check the shape of one parameter value (scalar / gradient / filter list); tuples come back as lists."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, _SCALARS) for v in value):
            return value
        if all(isinstance(v, dict) for v in value):
            for entry in value:
                for key in entry:
                    if key not in ("filter", "value"):
                        raise ValueError(f"unknown key {key!r} in a {{filter, value}} entry"
                                         f"{closest(key, ('filter', 'value'))}")
                if "value" not in entry:
                    raise ValueError("a {filter, value} entry has no 'value'")
                if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                    raise ValueError(f"filter must be a string, got {entry['filter']!r}")
                inner = entry["value"]
                if isinstance(inner, tuple):
                    entry["value"] = inner = list(inner)
                if not (isinstance(inner, _SCALARS) or (isinstance(inner, list) and inner
                                                        and all(isinstance(v, _SCALARS) for v in inner))):
                    raise ValueError(f"a filter's value must be a scalar or a list of scalars, got {inner!r}")
            return value
    raise ValueError(f"expected a scalar, a list of scalars (a gradient over layers) or a list of "
                     f"{{filter, value}} entries, got {value!r}")


def _check_parameters(params: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if params is None:
        return None
    out = {}
    for key, value in params.items():
        try:
            out[key] = _check_setting(value)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
    return out


# A `parameters:` mapping: parameter name → value (scalar, gradient or filter list), shape-checked on load.
Parameters = Annotated[Optional[dict[str, Any]], AfterValidator(_check_parameters)]


class InputModel(_Strict):
    """One entry of ``models:``."""

    model: ModelRef
    parameters: Parameters = None


class InputSlice(_Strict):
    """One source of an output slice: layers ``[start, end)`` of a model."""

    model: ModelRef
    layer_range: tuple[int, int]
    parameters: Parameters = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"expected [start, end) with 0 <= start < end, got {list(v)}")
        return v


class OutputSlice(_Strict):
    """One entry of ``slices:``: a run of output layers made from the same number of layers of each source."""

    sources: list[InputSlice]
    base_model: Optional[ModelRef] = None
    residual_weight: Optional[float] = None  # accepted, not used (mergekit does not use it either)
    parameters: Parameters = None

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[InputSlice]) -> list[InputSlice]:
        if not v:
            raise ValueError("a slice needs at least one source")
        lengths = [s.layer_range[1] - s.layer_range[0] for s in v]
        if len(set(lengths)) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers, got {lengths}")
        return v


class TokenizerConfig(_Strict):
    """mergekit's ``tokenizer:`` block; splice supports only choosing the source (no vocabulary surgery)."""

    source: Optional[Any] = None
    tokens: Optional[dict[str, Any]] = None
    pad_to_multiple_of: Optional[int] = None


class MergeConfig(_Strict):
    """A merge, as mergekit's YAML describes it. Exactly one of `models` and `slices` is given.

    Attributes:
        merge_method: A name from `splice.merge.methods.registry.merge_method_names()`.
        base_model: The model the task vectors are taken against (required by delta methods, SLERP, ...).
        models: Whole models to merge, each with its per-model parameters.
        slices: Layer ranges stacked into the output (frankenmerges), each slice merging its sources.
        parameters: Global parameters (and defaults of per-model ones).
        dtype: Inputs are rounded to this dtype before merging, and it is the output's dtype unless `out_dtype`.
        out_dtype: The dtype of the written weights.
        tokenizer_source: ``base``, or a model whose tokenizer is copied (default: the base, else the first model).
        tokenizer: mergekit's tokenizer block (only ``source`` is supported).
        chat_template: Accepted and ignored (the tokenizer is copied as it is).
    """

    merge_method: str
    base_model: Optional[ModelRef] = None
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Parameters = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[Any] = None
    tokenizer: Optional[TokenizerConfig] = None
    chat_template: Optional[str] = None
    modules: Optional[Any] = None  # mergekit's multi-module form: refused with a clear message

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise SpliceError(_one_line(err)) from None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        name = v.removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}{closest(name, DTYPES)}; expected one of {', '.join(DTYPES)}")
        return name

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer_source(cls, v: Any) -> Any:
        if v is None or v == "base":
            return v
        if v == "union":
            raise ValueError("'union' (a merged vocabulary) is not supported by splice; use 'base' or a model")
        return ModelRef.model_validate(v)

    @model_validator(mode="after")
    def _semantics(self) -> MergeConfig:
        if self.modules is not None:
            raise ValueError("modules: multi-module configs are not supported by splice; use models or slices")
        if (self.models is None) == (self.slices is None) or not (self.models or self.slices):
            raise ValueError("exactly one of 'models' and 'slices' must be given (and not empty)")
        if self.tokenizer is not None:
            if self.tokenizer_source is not None:
                raise ValueError("give tokenizer_source or tokenizer, not both")
            if self.tokenizer.tokens or self.tokenizer.pad_to_multiple_of:
                raise ValueError("tokenizer: tokens and pad_to_multiple_of (vocabulary surgery) are not supported "
                                 "by splice; only tokenizer.source is")
        source = self.tokenizer.source if self.tokenizer is not None else None
        if source is not None:
            object.__setattr__(self, "tokenizer_source", self._tokenizer_source(source))
        _check_method(self)
        return self

    # ---- helpers used by the planner ----------------------------------------------------------------------

    def notes(self) -> list[str]:
        """What this config asks for that splice accepts but does not use."""
        out = []
        if self.chat_template is not None:
            out.append("chat_template is ignored: the tokenizer files are copied as they are")
        if any(s.residual_weight is not None for s in self.slices or []):
            out.append("residual_weight is ignored (mergekit does not use it either)")
        if any(r.override_architecture for r in self.model_refs()):
            out.append("override_architecture is ignored: splice reads tensors by name, not by architecture")
        return out

    def model_refs(self) -> list[ModelRef]:
        """Every model the config names, first occurrence order (base first)."""
        refs = [self.base_model] if self.base_model else []
        refs += [m.model for m in self.models or []]
        for s in self.slices or []:
            refs += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
        if isinstance(self.tokenizer_source, ModelRef):
            refs.append(self.tokenizer_source)
        return list(dict.fromkeys(refs))

    def to_yaml(self) -> str:
        """The config as YAML (what the model card shows when the config did not come from a file)."""
        import yaml

        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False).rstrip()


def base_as_input(method: Any) -> bool:
    """Whether merge method `method` (a registry entry) merges a configured base as one more model."""
    return bool(getattr(method, "base_as_input", method.name in BASE_AS_INPUT))


def _check_method(cfg: MergeConfig) -> None:
    """Method name, parameter names and types, required parameters and base, against the method's registry entry."""
    from splice.merge.methods.registry import get_merge_method

    try:
        method = get_merge_method(cfg.merge_method)
    except SpliceError as err:
        raise ValueError(f"merge_method: {err}") from None
    shared, per_model = method.params, method.model_params
    valid = {**shared, **per_model}

    def check(params: Optional[dict[str, Any]], path: str, per_model_scope: bool) -> None:
        for key, value in (params or {}).items():
            if key not in valid:
                raise ValueError(f"{path}.{key}: unknown parameter {key!r} for merge_method {method.name!r}"
                                 f"{closest(key, valid)}; valid: {', '.join(valid) or 'none'}")
            if per_model_scope and key in shared:
                raise ValueError(f"{path}.{key}: {key!r} is a global parameter of {method.name!r}, not a per-model "
                                 f"one; set it under the top-level (or slice) parameters")
            for leaf in _leaves(value):
                try:
                    _validator(valid[key].kind)(leaf)
                except ValidationError:
                    raise ValueError(f"{path}.{key}: expected {_kind_name(valid[key].kind)}, got {leaf!r}") from None

    check(cfg.parameters, "parameters", False)
    for i, m in enumerate(cfg.models or []):
        check(m.parameters, f"models[{i}].parameters", True)
    for i, s in enumerate(cfg.slices or []):
        check(s.parameters, f"slices[{i}].parameters", False)
        for j, src in enumerate(s.sources):
            check(src.parameters, f"slices[{i}].sources[{j}].parameters", True)

    # Required parameters and the base, per group of inputs (the models, or each slice).
    groups = ([("models", cfg.base_model, [(f"models[{i}]", m.model, m.parameters) for i, m in enumerate(cfg.models)],
                None)] if cfg.models else
              [(f"slices[{i}]", s.base_model or cfg.base_model,
                [(f"slices[{i}].sources[{j}]", src.model, src.parameters) for j, src in enumerate(s.sources)],
                s.parameters) for i, s in enumerate(cfg.slices)])
    for where, base, entries, slice_params in groups:
        if method.needs_base and base is None:
            raise ValueError(f"merge_method {method.name!r} needs base_model (the model the others are compared "
                             f"against)")
        scopes = [slice_params or {}, cfg.parameters or {}]
        for name, p in shared.items():
            if p.required and not any(name in s for s in scopes):
                raise ValueError(f"missing required parameter {name!r} of merge_method {method.name!r} "
                                 f"(set it under parameters)")
        if cfg.models and base is not None and base_as_input(method) and base not in [r for _, r, _ in entries]:
            entries = [*entries, ("base_model", base, {})]  # merged as one more model (see BASE_AS_INPUT)
        for path, ref, params in entries:
            if method.needs_base and ref == base:
                continue  # the base takes no per-model parameters
            for name, p in per_model.items():
                if p.required and not any(name in s for s in [params or {}, *scopes]):
                    extra = (f" ({method.name} merges base_model as one more model, as mergekit does: list it "
                             f"under models with its {name}, or set {name} under parameters)"
                             if path == "base_model" else "")
                    raise ValueError(f"{path}: missing required parameter {name!r} of merge_method {method.name!r} "
                                     f"for model {str(ref)!r}{extra}")


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, _SCALARS):
        return [value]
    out: list[Any] = []
    for v in value if isinstance(value, list) else [value]:
        out += _leaves(v["value"]) if isinstance(v, dict) else [v]
    return out


def _kind_name(kind: Any) -> str:
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(kind, str(kind))


@functools.lru_cache(maxsize=None)
def _validator(kind: Any):
    return TypeAdapter(kind).validate_python


def torch_dtype(name: Optional[str]) -> Any:
    """The torch dtype of a config dtype name (None for None)."""
    import torch

    return None if name is None else getattr(torch, name)


def evaluate_setting(setting: Any, tensor_name: str, t: float, kind: Any = float) -> Any:
    """The value of one parameter setting for one tensor (mergekit's rules; see the module docstring).

    Args:
        setting: a checked parameter value: scalar, gradient list, or list of ``{filter, value}`` entries.
        tensor_name: the name filters are matched against (substring match).
        t: position of the tensor's layer in its slice, in [0, 1] (0 outside the layers).
        kind: the parameter's type; values are validated (and gradients' results converted) with it.

    Returns:
        The value, or None when no filter matched (the caller then asks the next scope).
    """
    validate = _validator(kind)
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, _SCALARS):
        return validate(setting)
    if not setting:
        return None
    if all(isinstance(v, _SCALARS) for v in setting):
        values = [validate(v) for v in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        pos = t * (len(values) - 1)
        i0 = int(pos)
        i1 = min(len(values) - 1, i0 + 1)
        frac = pos - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    for entry in setting:
        f = entry.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(entry["value"], tensor_name, t, kind)
    return None


def load_config(source: str | Path | dict[str, Any] | MergeConfig) -> tuple[MergeConfig, str]:
    """Read and validate a merge config.

    Args:
        source: a YAML file path, an already parsed dict, or a `MergeConfig` (returned as is).

    Returns:
        ``(config, yaml_text)``: the YAML text is the file's own (for the model card), or the config dumped.

    Raises:
        SpliceError: unreadable or invalid YAML, an unknown key (naming the closest valid one), an unknown method
            or parameter, a missing required parameter; always one line starting with the file name.
    """
    if isinstance(source, MergeConfig):
        return source, source.to_yaml()
    if isinstance(source, dict):
        cfg = _from_dict(source, "config")
        return cfg, cfg.to_yaml()
    from splice.io.checkpoints import parse_yaml, read_text

    path = Path(source)
    text = read_text(path, "config file")
    return _from_dict(parse_yaml(text, path), str(path)), text.strip()


def _from_dict(data: Any, where: str) -> MergeConfig:
    if not isinstance(data, dict):
        raise SpliceError(f"{where}: expected a mapping with keys merge_method, models or slices, ...; "
                          f"got {type(data).__name__}")
    try:
        return MergeConfig(**{str(k): v for k, v in data.items()})
    except SpliceError as err:
        raise SpliceError(f"{where}: {err}") from None


def _one_line(err: ValidationError) -> str:
    """The first error of a pydantic ValidationError as ``yaml.path: what is wrong``."""
    errors = err.errors(include_url=False)
    # A misspelt key also makes its correct spelling "missing": the unknown key is the message that helps.
    e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = [p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function")))]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    kind = e["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        owner = _model_at(loc[:-1])
        valid = list(owner.model_fields) if owner else []
        msg = f"unknown key {key!r}{closest(key, valid)}" + (f"; valid: {', '.join(valid)}" if valid else "")
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "value_error":
        msg = str(e["ctx"]["error"])
    else:
        msg = f"{e['msg']} (got {e.get('input')!r})"
    return f"{path}: {msg}" if path else msg


def _model_at(loc: list[Any]) -> type[BaseModel] | None:
    """The pydantic model class that a location inside MergeConfig points into."""
    import typing

    cls: type[BaseModel] = MergeConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        found = [a for a in _flatten(field.annotation, typing) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not found:
            return None
        cls = found[0]
    return cls


def _flatten(annotation: Any, typing: Any) -> list[Any]:
    args = typing.get_args(annotation)
    return [annotation] if not args else [x for a in args for x in _flatten(a, typing)]

