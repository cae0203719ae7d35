"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190).

    attention_l(x) = softmax(q [P_K,l ; K_l(x)]ᵀ / √d) [P_V,l ; V_l(x)]      for every layer l

n learned key/value vectors per layer sit in front of the keys and values computed from the input (as a pre-filled
KV cache, so no rotary position is applied to them and the real tokens' positions start at n). With
`prefix_projection` the prefix is P = MLP(E), E (n × d) trained through a two-layer tanh MLP, which the paper uses
for stability; without it P (n × layers·2·d) is trained directly. Saved in PEFT's format: `prompt_embeddings`
(n, layers·2·d), the prefix itself (the MLP is not saved, as in PEFT), peft_type PREFIX_TUNING.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from splice.adapters.config import doc
from splice.adapters.prompts.base import PromptConfig, PromptDims
from splice.adapters.registry import register
from splice.errors import SpliceError


@dataclass
class PrefixTuningConfig(PromptConfig):
    """Prefix tuning; field names follow PEFT's `PrefixTuningConfig`."""

    peft_type = "PREFIX_TUNING"
    kind = "prefix"

    prefix_projection: bool = doc("Train the prefix through a two-layer tanh MLP (reparameterisation).",
                                  default=False)
    encoder_hidden_size: int | None = doc("Hidden width of that MLP (default: the key/value width).", default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size < 1):
            raise SpliceError(f"encoder_hidden_size: must be a positive integer, got {self.encoder_hidden_size!r}")

    def peft_fields(self, dims: PromptDims) -> dict:
        return {"prefix_projection": self.prefix_projection,
                "encoder_hidden_size": self.encoder_hidden_size or dims.token_dim, "init_weights": None}


@register("prefix_tuning", config=PrefixTuningConfig, reference="https://arxiv.org/abs/2101.00190")
class PrefixEncoder(nn.Module):
    """The prefix of every layer, optionally through an MLP (PEFT's `PrefixEncoder`, same parameter names)."""

    def __init__(self, dims: PromptDims, config: PrefixTuningConfig, word_embeddings: nn.Module | None = None):
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        width = dims.num_layers * 2 * dims.token_dim
        self.transform = None
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or dims.token_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, dims.token_dim)
            self.transform = nn.Sequential(nn.Linear(dims.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)

    def virtual_tokens(self) -> Tensor:
        table = self.embedding.weight
        return table if self.transform is None else self.transform(table)  # (n, layers·2·d)
