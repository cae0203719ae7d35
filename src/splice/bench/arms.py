"""The rows of the adapter table, built from the registry so a newly registered method appears with no edit here.

Every registered method trains with its config's defaults (plus `rank` r=8 where the config has one). LoRA also
gets an all-linear variant. Methods that PEFT implements too (LoRA and DoRA, which PEFT writes as `use_dora`) get a
PEFT row with the same config, translated by splice's own PEFT writer (`peft_config_dict`). Two rows are not
adapters: the head-only probe (the base encoder frozen) and full fine-tuning. Every registered training strategy
(`splice.train.optim`: GaLore, LISA, HFT, ReLoRA) gets a row on top of what it pairs with, with its defaults: full
fine-tuning, or splice LoRA on query/value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PEFT_METHODS = {"lora", "dora"}  # the registered methods whose config `peft_config_dict` can translate
VARIANTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "lora": [("q,v", {"target_modules": ["query", "value"]}), ("all-linear", {"target_modules": "all-linear"})],
    "dora": [("q,v", {"target_modules": ["query", "value"]})],
}
PROBE, FULL = "probe", "full"
# what a training strategy trains on top of (its `pairs_with`) → (impl, method, variant, fields) of that arm
STRATEGY_BASES = {"full": ("-", FULL, "", {}),
                  "lora": ("splice", "lora", "q,v", {"target_modules": ["query", "value"]})}


@dataclass(frozen=True)
class Arm:
    """One trained configuration: `method` is "probe", "full" or a registered adapter method; `strategy` a
    registered training strategy (or "")."""

    impl: str  # "splice", "peft" or "-" (probe and full fine-tuning are the same code for both)
    method: str
    variant: str = ""
    fields: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    strategy: str = ""

    @property
    def key(self) -> str:
        slug = self.variant.replace(",", "").replace("-", "_")
        return "_".join(p for p in (self.impl if self.impl != "-" else "", self.method, slug, self.strategy) if p)

    @property
    def label(self) -> str:
        name = {"probe": "head-only probe", "full": "full fine-tune"}.get(self.method, self.method)
        return " ".join(p for p in (name, self.variant) if p) + (f" + {self.strategy}" if self.strategy else "")

    @property
    def trains_encoder(self) -> bool:
        return self.method != PROBE

    def adapter_config(self) -> Any:
        """The splice config of an adapter arm (r=8, alpha=16 where the method has them)."""
        from dataclasses import fields as dc_fields

        from splice.adapters.registry import get_method, make_config
        from splice.adapters.targets import QUERY_VALUE

        own = {f.name: f.default for f in dc_fields(get_method(self.method).config)}
        # r=8 only where the method sizes itself by a rank: OFT's r defaults to 0 (its block size decides instead).
        defaults = {k: v for k, v in {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}.items()
                    if k in own and not (k == "r" and own[k] == 0)}
        if "target_modules" in own and own["target_modules"] is None:
            # Named, not left to the architecture: PEFT's twin of the arm gets the same modules (PEFT's own
            # default differs per method, e.g. IA3's key, value and output.dense).
            defaults["target_modules"] = list(QUERY_VALUE["bert"])
        return make_config(self.method, **{**defaults, **self.fields})


def arms() -> list[Arm]:
    """Probe, every registered method (and its PEFT twin where PEFT has it), every registered training strategy on
    what it pairs with, full fine-tuning."""
    from splice.adapters.registry import method_names
    from splice.train.optim.registry import get_strategy, strategy_names

    out = [Arm("-", PROBE)]
    for name in method_names():
        for variant, fields in VARIANTS.get(name, [("", {})]):
            out.append(Arm("splice", name, variant, fields))
            if name in PEFT_METHODS:
                out.append(Arm("peft", name, variant, fields))
    for name in strategy_names():
        impl, method, variant, fields = STRATEGY_BASES[get_strategy(name).pairs_with]
        out.append(Arm(impl, method, variant, dict(fields), strategy=name))
    out.append(Arm("-", FULL))
    return out


def peft_config(arm: Arm) -> Any:
    """PEFT's LoraConfig for a LoRA/DoRA arm: the fields splice writes into a PEFT adapter_config.json."""
    import peft

    from splice.io.peft_format import peft_config_dict

    cfg = peft_config_dict(arm.adapter_config(), fan_in_fan_out=False, base=None)
    keep = {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "target_modules",
            "exclude_modules", "init_lora_weights"}
    return peft.LoraConfig(**{k: v for k, v in cfg.items() if k in keep})
