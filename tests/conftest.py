"""Tiny random-weight models built from transformers configs (seeded), and input batches for them.

Every model is built fresh on each call (a few milliseconds), in eval mode, so a test can make as many identical
copies of "the base" as it needs: `TINY["bert"].build()` twice gives bit-identical weights, `build(seed=1)` a
different base of the same shapes, `build(hidden=48)` a base of other shapes.

Test modules reach these through the `tiny` fixture (pytest runs with --import-mode=importlib, so conftest is not
importable as a module).
"""
from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)

# Tiny matmuls: one thread is fastest, and on a busy 2-core machine OpenMP's hand-off between threads made every
# small matmul take ~20 ms (the whole suite 10x slower).
torch.set_num_threads(1)

VOCAB = 100
SEQ = 6
# Larger than the HF default (0.02) so that outputs are O(0.1–1) and a tolerance of 1e-5 means something.
INIT_STD = 0.1


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make()
    return model.eval()


def build_bert(seed: int = 0, hidden: int = 32) -> BertModel:
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=32, initializer_range=INIT_STD,
                     attn_implementation="eager")
    return _seeded(seed, lambda: BertModel(cfg))


def build_llama(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      initializer_range=INIT_STD, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      attn_implementation="eager")
    return _seeded(seed, lambda: LlamaForCausalLM(cfg))


def build_gpt2(seed: int = 0, hidden: int = 32) -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=2, n_head=2, n_positions=32,
                     initializer_range=INIT_STD, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    return _seeded(seed, lambda: GPT2LMHeadModel(cfg))


def build_cnn(seed: int = 0, hidden: int = 8) -> nn.Sequential:
    """conv → relu → conv → relu → pool → flatten → linear head, with names ('conv1', 'head', ...)."""
    return _seeded(seed, lambda: nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, hidden, 3, padding=1)),
        ("act1", nn.ReLU()),
        ("conv2", nn.Conv2d(hidden, hidden, 3, stride=2)),
        ("act2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("head", nn.Linear(hidden, 4)),
    ])))


def token_batch(rows: int = 3, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (rows, SEQ), generator=g)}


def image_batch(rows: int = 3, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(rows, 3, 8, 8, generator=g)}


def run_bert(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    out = model(**batch)
    # (rows, SEQ·hidden + hidden): the pooler is included so that a `modules_to_save=["pooler.dense"]` shows up.
    return torch.cat([out.last_hidden_state.flatten(1), out.pooler_output], 1)


def run_lm(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(**batch).logits  # (rows, SEQ, VOCAB)


def run_cnn(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(batch["x"])  # (rows, 4)


@dataclass(frozen=True)
class Tiny:
    """One tiny model family: how to build it, a batch for it, and how to get one output tensor (rows first)."""

    name: str
    build: Callable[..., nn.Module]
    batch: Callable[..., dict[str, Tensor]]
    run: Callable[[nn.Module, dict[str, Tensor]], Tensor]

    @staticmethod
    def row(batch: dict[str, Tensor], i: int) -> dict[str, Tensor]:
        """Row `i` of every tensor in `batch`, as a batch of one."""
        return {k: v[i:i + 1] for k, v in batch.items()}

    def output(self, model: nn.Module, batch: dict[str, Tensor] | None = None) -> Tensor:
        """The model's output on `batch` (default: the standard 3-row batch), without autograd."""
        with torch.no_grad():
            return self.run(model, self.batch() if batch is None else batch)


TINY: dict[str, Tiny] = {
    "bert": Tiny("bert", build_bert, token_batch, run_bert),
    "llama": Tiny("llama", build_llama, token_batch, run_lm),
    "gpt2": Tiny("gpt2", build_gpt2, token_batch, run_lm),
    "cnn": Tiny("cnn", build_cnn, image_batch, run_cnn),
}


@pytest.fixture(autouse=True)
def _seed_global_generators() -> None:
    """Every test starts from the same global random state: an adapter's own init (and dropout, sampling, ...)
    draws from torch's global generator, which torch otherwise seeds differently in each process, so a test whose
    outcome depends on the draw would pass or fail by chance."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> dict[str, Tiny]:
    """The tiny model families by name: 'bert', 'llama', 'gpt2', 'cnn'."""
    return TINY


@pytest.fixture
def bert() -> BertModel:
    return build_bert()


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return build_llama()


@pytest.fixture
def gpt2() -> GPT2LMHeadModel:
    return build_gpt2()


@pytest.fixture
def cnn() -> nn.Sequential:
    return build_cnn()


@pytest.fixture
def tokens() -> dict[str, Tensor]:
    return token_batch()


@pytest.fixture
def images() -> dict[str, Tensor]:
    return image_batch()
