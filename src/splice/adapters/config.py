"""The fields every adapter config shares, and strict construction from plain dicts (YAML, JSON, CLI)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from splice.errors import SpliceError, closest


def doc(text: str, **kw: Any) -> Any:
    """A dataclass field carrying its help text, the way PEFT's configs do (`metadata={"help": ...}`)."""
    return field(metadata={"help": text}, **kw)


@dataclass
class AdapterConfig:
    """Where an adapter goes; method configs subclass this and add their own fields."""

    method: ClassVar[str] = ""

    target_modules: list[str] | str = doc(
        "Modules to wrap: a list of name suffixes (['query', 'value']), one regex matched against the full module "
        "name, or 'all-linear' (every linear layer except the output head).",
        default_factory=lambda: ["query", "value"],
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
