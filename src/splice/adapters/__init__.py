"""Adapter methods (one file each) and the operations on an adapted model."""
from splice.adapters.config import AdapterConfig
from splice.adapters.dora import DoraConfig
from splice.adapters.lora import LoraConfig
from splice.adapters.model import (AdaptedModel, active_adapters, adapt, delete_adapter, disable_adapters, get_delta,
                                   merge_adapter, merge_and_unload, mixed_batch, set_adapter, trainable_parameters,
                                   unmerge_adapter)
from splice.adapters.persist import load_adapter, save_adapter
from splice.adapters.prompts import PrefixTuningConfig, PromptTuningConfig, PTuningConfig
from splice.adapters.registry import get_method, make_config, method_names, register

__all__ = ["AdapterConfig", "AdaptedModel", "DoraConfig", "LoraConfig", "active_adapters", "adapt", "delete_adapter",
           "disable_adapters", "get_delta", "get_method", "load_adapter", "make_config", "merge_adapter",
           "merge_and_unload", "method_names", "mixed_batch", "register", "save_adapter", "set_adapter",
           "trainable_parameters", "unmerge_adapter"]
__all__ += ["PTuningConfig", "PrefixTuningConfig", "PromptTuningConfig"]
