"""A tiny random Llama folder with a 100-word tokenizer, a folder of LoRA adapters for it, and references.

The reference for every adapter is the library alone: a fresh base, `splice.load_adapter`, HF `generate` with
greedy decoding, one prompt at a time, no server and no batching.
"""
from __future__ import annotations

import json

import pytest
import torch
import helpers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import splice

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]  # ids 0..3, matching the Llama config below
WORDS = [f"w{i}" for i in range(4, 100)]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")
ADAPTERS = ("alpha", "beta", "gamma")
PROMPTS = ["w5 w6 w7", "w10 w11 w12 w13 w14", "w20", "w30 w31 w32 w33 w34 w35 w36 w37"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    out = helpers.word_tokenizer(WORDS + ["role", "user", "assistant", "system", ":"], SPECIALS,
                                 split_punctuation=False, bos_token="[BOS]")
    out.chat_template = CHAT_TEMPLATE
    return out


def build_llama(vocab: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      attn_implementation="eager")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def make_adapter(base: torch.nn.Module, path, seed: int, r: int = 4) -> None:
    model = build_llama(base.config.vocab_size)
    splice.adapt(model, splice.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in splice.trainable_parameters(model):  # large enough that every adapter changes the greedy tokens
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    splice.save_adapter(model, path, "default")


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """(model folder, adapters folder) on disk, built once for the session."""
    root = tmp_path_factory.mktemp("serve")
    tok = word_tokenizer()
    model = build_llama(len(tok))
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i, name in enumerate(ADAPTERS):
        make_adapter(model, root / "adapters" / name, seed=i + 1, r=2 + 2 * i)
    broken = root / "adapters" / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((root / "adapters" / "alpha" / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return root / "base", root / "adapters"


def reference_tokens(base_dir, adapter_dir, prompt: str, max_tokens: int) -> list[int]:
    """Greedy tokens of the adapter alone in the library (no server, no batching)."""
    model = LlamaForCausalLM.from_pretrained(base_dir).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(base_dir)
    if adapter_dir is not None:
        splice.load_adapter(model, adapter_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="session")
def references(served):
    """(adapter or None, prompt) → the reference's greedy tokens (8 of them at most)."""
    base, adapters = served
    return {(name, p): reference_tokens(base, None if name is None else adapters / name, p, 8)
            for name in (None, *ADAPTERS) for p in PROMPTS}


def read_json(path):
    return json.loads(path.read_text())
