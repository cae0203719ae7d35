"""Prompt methods: learned virtual tokens instead of a weight delta (one file per method, registered by name).

They share the adapter API (`splice.adapt`, `set_adapter`, `disable_adapters`, `save_adapter`, `load_adapter`,
`trainable_parameters`, ...) and PEFT's folder format, and refuse, with one line, what needs a weight delta
(merge, `get_delta`, `splice apply`, `splice merge`). See base.py for how the prompt reaches the model.
"""
from splice.adapters.prompts.base import PromptConfig
from splice.adapters.prompts.p_tuning import PTuningConfig
from splice.adapters.prompts.prefix_tuning import PrefixTuningConfig
from splice.adapters.prompts.prompt_tuning import PromptTuningConfig

__all__ = ["PTuningConfig", "PrefixTuningConfig", "PromptConfig", "PromptTuningConfig"]
