"""Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691).

    embeds' = [P ; E(x)]        P ∈ ℝ^{n × d}: n learned virtual-token embeddings in front of the input's

The whole model stays frozen; only P trains. P starts random (N(0, 1), PEFT's `RANDOM`), as the embeddings of
randomly drawn vocabulary tokens (`sample_vocab`), or as the embeddings of a text's tokens, repeated or cut to n
(`text`, e.g. a description of the task), which the paper finds trains faster and more stably than random.
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

INITS = ("random", "sample_vocab", "text")


@dataclass
class PromptTuningConfig(PromptConfig):
    """Prompt tuning; field names follow PEFT's `PromptTuningConfig`."""

    peft_type = "PROMPT_TUNING"

    prompt_tuning_init: str = doc("Start of the virtual tokens: random (N(0, 1)), sample_vocab (embeddings of "
                                  "random vocabulary tokens) or text (embeddings of prompt_tuning_init_text's "
                                  "tokens).", default="random")
    prompt_tuning_init_text: str | None = doc("The text of the text init.", default=None)
    tokenizer_name_or_path: str | None = doc("The tokenizer of the text init: a model folder or hub id.",
                                             default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = str(self.prompt_tuning_init).lower()
        if self.prompt_tuning_init not in INITS:
            raise SpliceError(f"prompt_tuning_init: must be one of {', '.join(INITS)}, got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "text" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise SpliceError("prompt_tuning_init: text needs prompt_tuning_init_text and tokenizer_name_or_path")

    def peft_fields(self, dims: PromptDims) -> dict:
        return {"prompt_tuning_init": self.prompt_tuning_init.upper(),
                "prompt_tuning_init_text": self.prompt_tuning_init_text,
                "tokenizer_name_or_path": self.tokenizer_name_or_path, "tokenizer_kwargs": None}


@register("prompt_tuning", config=PromptTuningConfig, reference="https://arxiv.org/abs/2104.08691")
class PromptEmbedding(nn.Module):
    """The table of n virtual-token embeddings (PEFT's `PromptEmbedding`, same parameter name)."""

    def __init__(self, dims: PromptDims, config: PromptTuningConfig, word_embeddings: nn.Module | None = None):
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.embedding = nn.Embedding(config.num_virtual_tokens, dims.token_dim)  # N(0, 1), as PEFT's RANDOM
        if config.prompt_tuning_init != "random" and word_embeddings is not None:
            vocab = word_embeddings.weight
            if config.prompt_tuning_init == "text":
                ids = text_token_ids(config, vocab.shape[0])
            else:
                ids = torch.randint(0, vocab.shape[0], (config.num_virtual_tokens,))
            with torch.no_grad():
                self.embedding.weight.copy_(vocab[ids.to(vocab.device)].float())

    def virtual_tokens(self) -> Tensor:
        return self.embedding.weight  # (n, d)


def text_token_ids(config: PromptTuningConfig, vocab_size: int) -> Tensor:
    """The text's token ids (as the tokenizer gives them, special tokens included), repeated or cut to n."""
    from transformers import AutoTokenizer

    from splice.io.models import resolve_model

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.tokenizer_name_or_path))
    except SpliceError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, ...: all mean "cannot load"
        raise SpliceError(f"tokenizer_name_or_path: cannot load tokenizer {config.tokenizer_name_or_path!r} "
                          f"({type(exc).__name__})") from exc
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids or max(ids) >= vocab_size:
        raise SpliceError(f"tokenizer_name_or_path: {config.tokenizer_name_or_path!r} gives token ids outside the "
                          f"model's vocabulary ({vocab_size}) or none at all")
    n = config.num_virtual_tokens
    return torch.tensor((ids * (n // len(ids) + 1))[:n], dtype=torch.long)
