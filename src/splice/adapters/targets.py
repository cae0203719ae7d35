"""The modules an adapter wraps when its config names none: each architecture's attention query and value
projections, by the model's ``config.model_type`` (as PEFT resolves ``target_modules=None``).

The names are the architectures' own (transformers' module names); a fused query-key-value projection stands for
both. An architecture not listed needs its modules named, or ``"all-linear"``. A method can keep its own table
(``AdapterConfig.architecture_defaults``): (IA)³ follows PEFT's, which adds a feed-forward layer.
"""
from __future__ import annotations

from torch import nn

QUERY_VALUE: dict[str, list[str]] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "ernie", "mobilebert",
                     "layoutlm", "vit", "deit", "data2vec-text", "nomic_bert"], ["query", "value"]),
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "gemma3_text", "phi", "olmo", "olmo2", "starcoder2", "stablelm", "cohere", "granite",
                     "opt", "gptj", "gpt_neo", "bart", "mbart", "marian", "pegasus", "whisper", "clip",
                     "siglip", "smollm3"], ["q_proj", "v_proj"]),
    **dict.fromkeys(["t5", "mt5", "umt5", "mpnet"], ["q", "v"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon"], ["query_key_value"]),
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "phi3": ["qkv_proj"],
    "mpt": ["Wqkv"],
}


# (IA)³'s own defaults, as PEFT's: keys and values, and a feed-forward layer whose *input* is rescaled.
IA3_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["bert", "roberta"], ["key", "value", "output.dense"]),
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    **dict.fromkeys(["llama", "mistral"], ["k_proj", "v_proj", "down_proj"]),
    "mixtral": ["k_proj", "v_proj", "w2"],
    **dict.fromkeys(["llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"], ["q_proj", "v_proj", "down_proj"]),
    **dict.fromkeys(["bart", "phi"], ["q_proj", "v_proj", "fc2"]),
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn", "mlp.c_proj"]),
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    **dict.fromkeys(["gpt_neox", "falcon"], ["query_key_value", "dense_4h_to_h"]),
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
}
# The last target of each is its feed-forward layer, except mt5's wi_1, which PEFT rescales at the output.
IA3_FEEDFORWARD: dict[str, list[str]] = {arch: [] if arch == "mt5" else names[-1:]
                                         for arch, names in IA3_TARGETS.items()}


def model_type(model: nn.Module) -> str | None:
    """The transformers ``model_type`` of `model` (from its ``config``), or None for a model without one."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)
