"""Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691).

    embeds' = [P ; E(x)]        P ∈ ℝ^{n × d}: n learned virtual-token embeddings in front of the input's

The whole model stays frozen; only P trains. P starts random (N(0, 1), PEFT's `RANDOM`), or as the embeddings of
randomly drawn vocabulary tokens (`sample_vocab`), which the paper finds trains faster and more stably.
Saved in PEFT's format: `prompt_embeddings` (n, d), peft_type PROMPT_TUNING.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from splice.adapters.config import doc
from splice.adapters.prompts.base import PromptConfig, PromptDims
from splice.adapters.registry import register
from splice.errors import SpliceError

INITS = ("random", "sample_vocab")


@dataclass
class PromptTuningConfig(PromptConfig):
    """Prompt tuning; field names follow PEFT's `PromptTuningConfig`."""

    peft_type = "PROMPT_TUNING"

    prompt_tuning_init: str = doc("Start of the virtual tokens: random (N(0, 1)) or sample_vocab (embeddings of "
                                  "random vocabulary tokens).", default="random")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = str(self.prompt_tuning_init).lower()
        if self.prompt_tuning_init not in INITS:
            raise SpliceError(f"prompt_tuning_init: must be one of {', '.join(INITS)}, got {self.prompt_tuning_init!r}")

    def peft_fields(self, dims: PromptDims) -> dict:
        return {"prompt_tuning_init": self.prompt_tuning_init.upper(), "prompt_tuning_init_text": None,
                "tokenizer_name_or_path": None, "tokenizer_kwargs": None}


@register("prompt_tuning", config=PromptTuningConfig, reference="https://arxiv.org/abs/2104.08691")
class PromptEmbedding(nn.Module):
    """The table of n virtual-token embeddings (PEFT's `PromptEmbedding`, same parameter name)."""

    def __init__(self, dims: PromptDims, config: PromptTuningConfig, word_embeddings: nn.Module | None = None):
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.embedding = nn.Embedding(config.num_virtual_tokens, dims.token_dim)  # N(0, 1), as PEFT's RANDOM
        if config.prompt_tuning_init == "sample_vocab" and word_embeddings is not None:
            vocab = word_embeddings.weight
            ids = torch.randint(0, vocab.shape[0], (config.num_virtual_tokens,), device=vocab.device)
            with torch.no_grad():
                self.embedding.weight.copy_(vocab[ids].float())

    def virtual_tokens(self) -> Tensor:
        return self.embedding.weight  # (n, d)
