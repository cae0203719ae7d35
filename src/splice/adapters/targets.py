"""The modules an adapter wraps when its config names none, by the model's ``config.model_type``, as PEFT resolves
``target_modules=None``: each architecture's attention query and value projections (PEFT's LoRA table), and the
few tables PEFT keeps per method (AdaLoRA, FourierFT, VeRA/SHiRA, (IA)³), each a method config's `target_table`.

The names are the architectures' own (transformers' module names); a fused query-key-value projection stands for
both. An architecture not listed needs its modules named, or ``"all-linear"``.
"""
from __future__ import annotations

from torch import nn

QUERY_VALUE: dict[str, list[str]] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "ernie", "mobilebert",
                     "layoutlm", "vit", "deit", "data2vec-text", "nomic_bert"], ["query", "value"]),
    **dict.fromkeys(["llama", "llama4", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                     "gemma2", "gemma3_text", "olmo", "olmo2", "starcoder2", "stablelm", "cohere", "granite",
                     "opt", "gptj", "gpt_neo", "bart", "mbart", "marian", "pegasus", "whisper", "clip",
                     "siglip", "smollm3"], ["q_proj", "v_proj"]),
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    **dict.fromkeys(["t5", "mt5", "umt5", "mpnet"], ["q", "v"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel", "chatglm"], ["query_key_value"]),
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    **dict.fromkeys(["phi3", "codegen"], ["qkv_proj"]),
    "mpt": ["Wqkv"],
    "btlm": ["c_proj", "c_attn"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

# AdaLoRA: every attention and feed-forward projection on the encoder-decoders and OPT, and the keys and dense
# layers too on RoBERTa and DeBERTa-v2 (as PEFT's table).
ADALORA_TARGETS: dict[str, list[str]] = QUERY_VALUE | {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    **dict.fromkeys(["bart", "opt"], ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}
# FourierFT: GPT-2's feed-forward output rather than its fused attention projection.
FOURIERFT_TARGETS: dict[str, list[str]] = QUERY_VALUE | dict.fromkeys(["gpt2", "gpt_bigcode"], ["mlp.c_proj"])
# VeRA and SHiRA: Phi's attention only.
ATTENTION_ONLY_TARGETS: dict[str, list[str]] = QUERY_VALUE | {"phi": ["q_proj", "v_proj"]}

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
    **dict.fromkeys(["gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel"], ["query_key_value", "dense_4h_to_h"]),
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
