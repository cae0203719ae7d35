"""The modules an adapter wraps when its config names none: each architecture's attention query and value
projections, by the model's ``config.model_type`` (as PEFT resolves ``target_modules=None``).

The names are the architectures' own (transformers' module names); a fused query-key-value projection stands for
both. An architecture not listed needs its modules named, or ``"all-linear"``.
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


def model_type(model: nn.Module) -> str | None:
    """The transformers ``model_type`` of `model` (from its ``config``), or None for a model without one."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_targets(model: nn.Module) -> list[str] | None:
    """The query and value projections of `model`'s architecture, or None for one not in `QUERY_VALUE`."""
    names = QUERY_VALUE.get(model_type(model) or "")
    return list(names) if names else None
