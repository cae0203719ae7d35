"""Helpers shared by test modules (importable as `helpers`: pytest puts tests/ on sys.path, see pyproject.toml)."""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def word_tokenizer(words: Iterable[str], specials: Iterable[str] = ("[PAD]", "[UNK]", "[EOS]"), *,
                   split_punctuation: bool = True, **tokens: str | None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: `specials` then `words`, one id each in that order, nothing added on its own.

    `tokens` are the special-token arguments of `PreTrainedTokenizerFast` (default: [UNK], [PAD] and [EOS]; None
    leaves one out). `split_punctuation=False` splits on whitespace only, so "role:" stays one word.
    """
    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    named = {"unk_token": "[UNK]", "pad_token": "[PAD]", "eos_token": "[EOS]", **tokens}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in named.items() if v is not None})
