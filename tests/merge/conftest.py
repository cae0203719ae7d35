"""Tiny model families for the merge-engine tests: a base and fine-tunes of it (base + noise), saved with
`save_pretrained` into tmp_path, plus helpers to write configs and LoRA adapters.

Everything is seeded; a family is a few hundred KB and saves in milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from torch import nn

VOCAB = 100


def word_tokenizer():
    """A 100-token word-level tokenizer (fits the tiny models' vocabulary), so outputs can carry a tokenizer."""
    from helpers import word_tokenizer

    return word_tokenizer(f"w{i}" for i in range(VOCAB - 3))


def build(kind: str, seed: int = 0, hidden: int = 32, layers: int = 4) -> nn.Module:
    """A tiny random Llama or GPT-2 (init std 0.1 so that differences are O(0.1), not O(0.02))."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "llama":
            cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                              max_position_embeddings=64, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2)
            return LlamaForCausalLM(cfg).eval()
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=2, n_positions=32,
                         initializer_range=0.1, bos_token_id=1, eos_token_id=2)
        return GPT2LMHeadModel(cfg).eval()


def perturbed(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """`model` + N(0, scale²) noise on every parameter: a stand-in for a fine-tune."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@dataclass
class Family:
    """A saved base and its fine-tunes."""

    kind: str
    base: Path
    fts: list[Path]


@pytest.fixture
def family(tmp_path: Path) -> Callable[..., Family]:
    """`family("llama", n=2, layers=4)`: base (with a tokenizer) + n fine-tunes, saved under tmp_path."""

    def make(kind: str = "llama", n: int = 2, layers: int = 4, hidden: int = 32, tokenizer: bool = True,
             seed: int = 0, name: str | None = None) -> Family:
        root = tmp_path / (name or f"{kind}-{layers}x{hidden}-s{seed}")
        base = build(kind, seed, hidden, layers)
        base.save_pretrained(root / "base")
        if tokenizer:
            word_tokenizer().save_pretrained(root / "base")
        fts = []
        for i in range(n):
            ft = perturbed(build(kind, seed, hidden, layers), i)
            ft.save_pretrained(root / f"ft{i}")
            fts.append(root / f"ft{i}")
        return Family(kind, root / "base", fts)

    return make


@pytest.fixture
def write_yaml(tmp_path: Path) -> Callable[[dict[str, Any], str], Path]:
    """Write a config dict as YAML and return its path."""

    def write(config: dict[str, Any], name: str = "merge.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    return write


def peft_lora(base: Path, out: Path, seed: int, *, r: int = 4, alpha: int = 8, targets: Any = None,
              fan_in_fan_out: bool = False, dora: bool = False, scale: float = 0.3) -> Path:
    """A PEFT LoRA (or DoRA) adapter of the model at `base`, with random non-zero B, saved at `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    targets = targets or (["c_attn", "c_fc"] if fan_in_fan_out else ["q_proj", "v_proj", "down_proj"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                      fan_in_fan_out=fan_in_fan_out, use_dora=dora))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, scale)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
def lora() -> Callable[..., Path]:
    """`lora(base_folder, out_folder, seed, r=4, ...)`: a PEFT adapter with random non-zero B (see `peft_lora`)."""
    return peft_lora


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) model folder."""
    from splice.io.checkpoints import CheckpointReader

    reader = CheckpointReader(folder)
    return {n: reader.get(n) for n in reader.keys()}


@pytest.fixture
def weights() -> Callable[[Path], dict[str, torch.Tensor]]:
    """`weights(folder)`: all tensors of a model folder, as a dict."""
    return load_weights
