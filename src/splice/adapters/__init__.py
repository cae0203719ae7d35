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
from splice.adapters.adalora import AdaLoraConfig
from splice.adapters.bitfit import BitFitConfig
from splice.adapters.boft import BOFTConfig
from splice.adapters.fourierft import FourierFTConfig
from splice.adapters.ia3 import IA3Config
from splice.adapters.ln_tuning import LNTuningConfig
from splice.adapters.loha import LoHaConfig
from splice.adapters.lokr import LoKrConfig
from splice.adapters.miss import MissConfig
from splice.adapters.oft import OFTConfig
from splice.adapters.randlora import RandLoraConfig
from splice.adapters.shira import ShiraConfig
from splice.adapters.vera import VeraConfig
from splice.adapters.houlsby import HoulsbyConfig
from splice.adapters.pfeiffer import PfeifferConfig
from splice.adapters.compacter import CompacterConfig
from splice.adapters.ssf import SSFConfig
from splice.adapters.dylora import DyLoraConfig, set_dylora_rank, truncate_dylora
from splice.adapters.increlora import IncreLoraConfig
from splice.adapters.sara import SaraConfig
from splice.adapters.spiel import SpielConfig
from splice.adapters.s2ft import S2FTConfig
from splice.adapters.paca import PacaConfig
from splice.adapters.nola import NolaConfig
from splice.adapters.svfit import SVFitConfig
from splice.adapters.sorsa import SorsaConfig
from splice.adapters.svft import SVFTConfig
from splice.adapters.loldu import LoLDUConfig
from splice.adapters.lora_sb import LoraSBConfig

__all__ = ["AdapterConfig", "AdaptedModel", "DoraConfig", "LoraConfig", "active_adapters", "adapt", "delete_adapter",
           "disable_adapters", "get_delta", "get_method", "load_adapter", "make_config", "merge_adapter",
           "merge_and_unload", "method_names", "mixed_batch", "register", "save_adapter", "set_adapter",
           "trainable_parameters", "unmerge_adapter"]
__all__ += ["AdaLoraConfig", "BitFitConfig", "BOFTConfig", "FourierFTConfig", "IA3Config", "LNTuningConfig", "LoHaConfig",
            "LoKrConfig", "MissConfig", "OFTConfig", "RandLoraConfig", "ShiraConfig", "VeraConfig"]
__all__ += ["PTuningConfig", "PrefixTuningConfig", "PromptTuningConfig"]
__all__ += ["HoulsbyConfig", "PfeifferConfig", "CompacterConfig", "SSFConfig"]
__all__ += ["DyLoraConfig", "IncreLoraConfig", "set_dylora_rank", "truncate_dylora"]
__all__ += ["SaraConfig", "SpielConfig", "S2FTConfig", "PacaConfig", "NolaConfig"]
__all__ += ["SVFitConfig", "SorsaConfig", "SVFTConfig", "LoLDUConfig", "LoraSBConfig"]
