"""The fields every adapter config shares, and strict construction from plain dicts (YAML, JSON, CLI)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from splice.adapters.targets import QUERY_VALUE
from splice.errors import SpliceError, closest


def doc(text: str, **kw: Any) -> Any:
    """A dataclass field carrying its help text, the way PEFT's configs do (`metadata={"help": ...}`)."""
    return field(metadata={"help": text}, **kw)


@dataclass
class AdapterConfig:
    """Where an adapter goes; method configs subclass this and add their own fields."""

    method: ClassVar[str] = ""
    # PEFT's `peft_type` for this method (adapter_config.json); None for methods PEFT does not have.
    peft_type: ClassVar[str | None] = None
    # Whether the method wraps modules of any type (as kind "module"; LN tuning), not only the kinds inject knows.
    wraps_any_module: ClassVar[bool] = False
    # Whether the update is a weight delta (`delta()` returns it). A bottleneck adapter with a non-linearity is
    # not: merge, get_delta, apply, compress and merge-of-folders refuse it with `not_a_delta`'s one line.
    has_delta: ClassVar[bool] = True
    # Fields splice filled in (target_modules from the model; AdaLoRA's total_step from the run): recorded for the
    # saved folder, and derived afresh when the config object is used again rather than kept from the last use.
    _from_run: ClassVar[frozenset[str]] = frozenset()
    # Fields whose None `architecture_defaults` fills in on the model (then recorded in `_from_run`), and the
    # model_type → target_modules table it reads (`splice.adapters.targets`).
    architecture_fields: ClassVar[tuple[str, ...]] = ("target_modules",)
    target_table: ClassVar[dict[str, list[str]]] = QUERY_VALUE

    target_modules: list[str] | str | None = doc(
        "Modules to wrap: a list of name suffixes (['query', 'value']), one regex matched against the full module "
        "name, or 'all-linear' (every linear layer except the output head). None: the architecture's attention "
        "query and value projections (query,value for BERT, q_proj,v_proj for Llama, c_attn for GPT-2, ...; "
        "`splice.adapters.targets`; a method PEFT gives other defaults, such as IA3 or AdaLoRA, uses PEFT's), "
        "recorded on the config when it is first used on a model.",
        default=None,
    )
    exclude_modules: list[str] | str | None = doc(
        "Modules never to wrap, same syntax as target_modules.", default=None
    )
    modules_to_save: list[str] | None = doc(
        "Modules trained in full (a copy per adapter) and saved with the adapter, e.g. a classifier head.",
        default=None,
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules:
                raise SpliceError("target_modules: empty list; name at least one module, or use 'all-linear'")
            self.target_modules = [str(t) for t in self.target_modules]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @property
    def needs_calibration(self) -> bool:
        """Whether this config starts its adapters from calibration data (LoRA's eva / lora_ga / corda, LoRA-SB):
        `splice train` then passes its first training batches to `adapt(..., calibration=...)`."""
        return False

    def architecture_defaults(self, model_type: str | None, unset: set[str]) -> dict[str, Any] | None:
        """Values for the `unset` fields that follow the model's architecture (by transformers' `model_type`):
        `target_modules` from `target_table`. None: no default for this architecture."""
        if "target_modules" not in unset:
            return {}
        names = self.target_table.get(model_type or "")
        return {"target_modules": list(names)} if names else None

    def prepare(self, targets: list[tuple[str, Any, str]], shared: dict[str, Any] | None) -> "AdapterConfig":
        """The config every module of one adapter is built with, given all its (name, module, kind) targets and
        the tensors a loaded folder shares across modules (VeRA's projections); default: the same."""
        return self

    def for_target(self, name: str) -> "AdapterConfig":
        """The config one wrapped module named `name` is built with (IA3 marks its feed-forward modules here)."""
        return self

    # -- PEFT's adapter_config.json: each method maps its own fields (io/peft_format.py only dispatches) ----------
    @classmethod
    def claims_peft(cls, cfg: dict[str, Any]) -> bool:
        """Whether a folder of this class's `peft_type` is this method (LoRA and DoRA share "LORA")."""
        return True

    @classmethod
    def fields_from_peft(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """Config fields from PEFT's adapter_config.json (values are validated by the dataclass afterwards).

        A method PEFT does not have reads back the fields `to_peft` wrote for it (its own, beyond the shared ones).
        """
        own = {} if cls.peft_type else {k: cfg[k] for k in _own_fields(cls) if k in cfg}
        return {"target_modules": _targets(cfg.get("target_modules")), "exclude_modules": cfg.get("exclude_modules"),
                "modules_to_save": cfg.get("modules_to_save"), **own}

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        """PEFT's adapter_config.json for this config; `kinds`/`adapters` are those of the wrapped modules."""
        target = self.target_modules
        # A method PEFT does not have keeps the folder's shape, names itself, and PEFT refuses it (peft_type null);
        # its own fields go in as they are, for `fields_from_peft` to read back.
        own = {} if self.peft_type else {"splice_method": self.method,
                                         **{k: getattr(self, k) for k in _own_fields(type(self))},
                                         # read by `splice apply`, which has only the weights: GPT-2's (in, out)
                                         "fan_in_fan_out": "conv1d" in kinds}
        return {"peft_type": self.peft_type, **own, "task_type": None, "base_model_name_or_path": base,
                "revision": None,
                "target_modules": target if isinstance(target, str) else list(target),
                "exclude_modules": self.exclude_modules, "modules_to_save": self.modules_to_save,
                "inference_mode": True}

    def for_module(self, module: str, tensors: dict[str, Any], peft_cfg: dict[str, Any]) -> "AdapterConfig":
        """The config of one module of a loaded folder (PEFT's rank_pattern / alpha_pattern); default: the same."""
        return self


def _own_fields(cls: type) -> list[str]:
    """The dataclass fields `cls` adds to AdapterConfig's."""
    shared = {f.name for f in dataclasses.fields(AdapterConfig)}
    return [f.name for f in dataclasses.fields(cls) if f.name not in shared]


def not_a_delta(method: str, action: str = "merged") -> SpliceError:
    """The one line every path that needs a weight delta raises for a method that has none (`has_delta` False)."""
    return SpliceError(f"{method} adapters are not a weight delta: they cannot be {action}; "
                       "serve or train them as they are")


def _targets(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value)
    return value or None  # PEFT's null: the architecture's own, resolved on the model


def pattern_value(module: str, patterns: dict[str, Any] | None, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module by full name, suffix or regex."""
    import re

    for pattern, value in (patterns or {}).items():
        try:
            hit = re.match(rf"(.*\.)?({pattern})$", module) is not None  # PEFT's get_pattern_key
        except re.error:
            hit = module == pattern or module.endswith("." + pattern)
        if hit:
            return value
    return default


def config_from_dict(cls: type, data: dict[str, Any], section: str | None = None):
    """Build config `cls` from `data`, rejecting unknown keys with the closest valid one named.

    Args:
        section: how messages name the config (default: "method <name>").
    """
    section = section or f"method {getattr(cls, 'method', cls.__name__)!r}"
    data = {k: v for k, v in data.items() if k != "method"}
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise SpliceError(f"unknown config key {key!r} for {section}{closest(key, names)}")
    try:
        return cls(**data)
    except TypeError as err:  # wrong value types surface here as well
        raise SpliceError(f"invalid config for {section}: {err}") from None


def field_help(cls: type) -> dict[str, str]:
    """Field name → help text, for `--help` and the docs."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
