"""Memory-efficient training strategies: options of the one training loop, one file each, registered by name.

    TrainConfig(strategy="galore", strategy_options={"rank": 8})      # or strategy=GaloreConfig(rank=8)
    splice train default data.csv -o out --method full --strategy lisa --strategy-option layers=2
"""
from splice.train.optim.element_age import ElementAgeAdamW
from splice.train.optim.galore import GaloreConfig, GaLoreAdamW
from splice.train.optim.hft import HftConfig
from splice.train.optim.lisa import LisaConfig
from splice.train.optim.registry import (STRATEGIES, StrategyConfig, TrainStrategy, build_strategy, get_strategy,
                                         make_strategy_config, register_strategy, strategy_names)
from splice.train.optim.relora import ReloraConfig

__all__ = ["ElementAgeAdamW", "GaLoreAdamW", "GaloreConfig", "HftConfig", "LisaConfig", "ReloraConfig", "STRATEGIES", "StrategyConfig",
           "TrainStrategy", "build_strategy", "get_strategy", "make_strategy_config", "register_strategy",
           "strategy_names"]
