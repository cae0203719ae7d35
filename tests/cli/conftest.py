"""Tiny model folders (random weights, word-level tokenizer) and data files for the CLI and apply tests."""
from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import word_tokenizer
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

WORDS = "good great fine happy love bad awful sad hate poor the a movie film plot was is very".split()
POSITIVE, NEGATIVE = WORDS[:5], WORDS[5:10]


def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS, ("[PAD]", "[UNK]", "[EOS]", "[CLS]", "[SEP]"))


@pytest.fixture
def bert_dir(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    path = tmp_path / "bert"
    BertModel(cfg).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def gpt2_dir(tmp_path):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=2, eos_token_id=2)
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def sentiment_csv(tmp_path):
    rng = random.Random(0)
    rows = ["text,label"]
    for i in range(120):
        label = i % 2
        words = rng.sample(POSITIVE if label else NEGATIVE, 2) + rng.sample(WORDS[10:], 3)
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{'pos' if label else 'neg'}")
    path = tmp_path / "sentiment.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def pairs_jsonl(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as fh:
        for _ in range(40):
            w = rng.choice(WORDS[:10])
            fh.write(json.dumps({"prompt": f"the {w} movie was", "completion": f" {w} {w}"}) + "\n")
    return path
