"""splice: adapt, compress, merge and serve fine-tunes. Every fine-tune is a delta on a base.

    import splice
    model = splice.adapt(model, splice.LoraConfig(r=8, target_modules=["query", "value"]))
    ...train...
    splice.save_adapter(model, "my-adapter")          # a PEFT folder: loads in PEFT, vLLM, LoRAX
"""
from __future__ import annotations

import importlib
from typing import Any

# Names resolve on first use (PEP 562): `splice merge` and `splice inspect` need neither the adapter code nor
# transformers, and importing everything up front cost a CLI call ~1–3 s.
_EXPORTS = {
    "splice.adapters": ("AdaptedModel", "DoraConfig", "LoraConfig", "active_adapters", "adapt", "delete_adapter",
                        "disable_adapters", "get_delta", "load_adapter", "merge_adapter", "merge_and_unload",
                        "method_names", "mixed_batch", "save_adapter", "set_adapter", "trainable_parameters",
                        "unmerge_adapter", "AdaLoraConfig", "BitFitConfig", "BOFTConfig", "FourierFTConfig",
                        "IA3Config", "LNTuningConfig", "LoHaConfig", "LoKrConfig", "MissConfig", "OFTConfig",
                        "RandLoraConfig", "ShiraConfig", "VeraConfig", "HoulsbyConfig", "PfeifferConfig",
                        "CompacterConfig",
                        "SSFConfig", "DyLoraConfig", "IncreLoraConfig", "set_dylora_rank", "truncate_dylora",
                        "SaraConfig", "SpielConfig", "S2FTConfig", "PacaConfig", "NolaConfig", "SVFitConfig",
                        "SorsaConfig", "SVFTConfig", "LoLDUConfig", "LoraSBConfig"),
    "splice.adapters.prompts": ("PrefixTuningConfig", "PromptTuningConfig", "PTuningConfig"),
    "splice.delta": ("Delta", "DeltaSet", "Dense", "Kron", "LowRank", "Scale", "Sparse"),
    "splice.errors": ("SpliceError",),
    "splice.train.loop": ("TrainConfig", "train_loop"),
    "splice.train.optim": ("GaloreConfig", "HftConfig", "LisaConfig", "ReloraConfig", "strategy_names"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name == "merge":  # the callable module: splice.merge(config, out)
        return importlib.import_module("splice.merge")
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'splice' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE, "merge"])


__version__ = "0.1.0"

__all__ = sorted([*_WHERE, "merge"])
