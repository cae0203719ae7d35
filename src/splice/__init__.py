"""splice: adapt, compress, merge and serve fine-tunes. Every fine-tune is a delta on a base.

    import splice
    model = splice.adapt(model, splice.LoraConfig(r=8, target_modules=["query", "value"]))
    ...train...
    splice.save_adapter(model, "my-adapter")          # a PEFT folder: loads in PEFT, vLLM, LoRAX
"""
from splice.adapters import (AdaptedModel, DoraConfig, LoraConfig, active_adapters, adapt, delete_adapter,
                             disable_adapters, get_delta, load_adapter, merge_adapter, merge_and_unload,
                             method_names, mixed_batch, save_adapter, set_adapter, trainable_parameters,
                             unmerge_adapter)
from splice.adapters.prompts import PrefixTuningConfig, PromptTuningConfig, PTuningConfig
from splice.delta import Delta, DeltaSet, Dense, LowRank, Scale, Sparse
from splice.errors import SpliceError
import splice.merge as merge  # callable: splice.merge(config, out)

__version__ = "0.1.0"

__all__ = ["AdaptedModel", "Delta", "DeltaSet", "Dense", "DoraConfig", "LoraConfig", "LowRank", "Scale",
           "SpliceError", "Sparse", "active_adapters", "adapt", "delete_adapter", "disable_adapters", "get_delta",
           "load_adapter", "merge", "merge_adapter", "merge_and_unload", "method_names", "mixed_batch", "save_adapter",
           "set_adapter", "trainable_parameters", "unmerge_adapter"]
__all__ += ["PTuningConfig", "PrefixTuningConfig", "PromptTuningConfig"]
