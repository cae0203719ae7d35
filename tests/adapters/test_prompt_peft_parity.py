"""Prompt methods against the installed PEFT, both ways, on the same weights.

For every row (a tiny model, a PEFT prompt-learning config and the same splice config):
- PEFT `save_pretrained` → `splice.load_adapter` on a fresh base → the same outputs (and the same LM loss);
- `splice.save_adapter` → `peft.PeftModel.from_pretrained` on a fresh base → the same outputs;
- the trainable encoders (prefix tuning's MLP, P-tuning's MLP/LSTM) with PEFT's weights copied in → the same
  outputs, so the encoder math is PEFT's too, not only the saved table.

Batches carry an attention mask with padding, so its extension is checked. Tolerance: 1e-5 absolute (fp32).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import peft
import pytest
import torch

import splice
from splice.adapters import make_config

ATOL = 1e-5


@dataclass(frozen=True)
class Row:
    id: str
    model: str  # a key of conftest.TINY
    peft_config: Callable[[], Any]
    method: str
    fields: dict[str, Any]


LM, FE = "CAUSAL_LM", "FEATURE_EXTRACTION"
ROWS = [
    Row("prompt-tuning-llama", "llama", lambda: peft.PromptTuningConfig(task_type=LM, num_virtual_tokens=4),
        "prompt_tuning", dict(num_virtual_tokens=4)),
    Row("prompt-tuning-gpt2", "gpt2", lambda: peft.PromptTuningConfig(task_type=LM, num_virtual_tokens=3),
        "prompt_tuning", dict(num_virtual_tokens=3)),
    Row("prompt-tuning-bert", "bert", lambda: peft.PromptTuningConfig(task_type=FE, num_virtual_tokens=5),
        "prompt_tuning", dict(num_virtual_tokens=5)),
    Row("prefix-tuning-llama-gqa", "llama", lambda: peft.PrefixTuningConfig(task_type=LM, num_virtual_tokens=4),
        "prefix_tuning", dict(num_virtual_tokens=4)),
    Row("prefix-tuning-llama-projection", "llama",
        lambda: peft.PrefixTuningConfig(task_type=LM, num_virtual_tokens=3, prefix_projection=True,
                                        encoder_hidden_size=24),
        "prefix_tuning", dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24)),
    Row("prefix-tuning-bert", "bert", lambda: peft.PrefixTuningConfig(task_type=FE, num_virtual_tokens=3),
        "prefix_tuning", dict(num_virtual_tokens=3)),
    Row("p-tuning-llama-mlp", "llama",
        lambda: peft.PromptEncoderConfig(task_type=LM, num_virtual_tokens=4, encoder_hidden_size=24),
        "p_tuning", dict(num_virtual_tokens=4, encoder_hidden_size=24)),
    Row("p-tuning-gpt2-lstm", "gpt2",
        lambda: peft.PromptEncoderConfig(task_type=LM, num_virtual_tokens=3, encoder_reparameterization_type="LSTM",
                                         encoder_hidden_size=16),
        "p_tuning", dict(num_virtual_tokens=3, encoder_reparameterization_type="LSTM", encoder_hidden_size=16)),
    Row("p-tuning-bert-mlp", "bert", lambda: peft.PromptEncoderConfig(task_type=FE, num_virtual_tokens=3),
        "p_tuning", dict(num_virtual_tokens=3)),
]
rows = pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])


def batch(tiny, row: Row) -> dict[str, torch.Tensor]:
    b = tiny[row.model].batch(rows=3)
    mask = torch.ones_like(b["input_ids"])
    mask[1, -2:] = 0  # right padding on one row
    return {**b, "attention_mask": mask}


def output(tiny, row: Row, model) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch(tiny, row))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def loss(tiny, row: Row, model) -> torch.Tensor:
    b = batch(tiny, row)
    with torch.no_grad():
        return model(**b, labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)).loss


@torch.no_grad()
def randomise(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * 0.5 * max(p.abs().mean().item(), 0.1))


def peft_model(tiny, row: Row, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = peft.get_peft_model(tiny[row.model].build(), row.peft_config())
    randomise([p for p in model.parameters() if p.requires_grad], seed)
    return model.eval()


def splice_model(tiny, row: Row, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = splice.adapt(tiny[row.model].build(), make_config(row.method, **row.fields))
    randomise(splice.trainable_parameters(model), seed)
    return model.eval()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@rows
def test_peft_folder_loads_in_splice_with_same_outputs(tiny, row, tmp_path):
    reference = peft_model(tiny, row)
    reference.save_pretrained(tmp_path / "peft")
    ours = splice.load_adapter(tiny[row.model].build(), tmp_path / "peft")
    expected = output(tiny, row, reference)
    base = output(tiny, row, tiny[row.model].build())
    n = expected.shape[1] - base.shape[1]
    assert (expected[:, n:] - base).abs().max() > 1e-3  # the prompt changes the real tokens' outputs
    close(output(tiny, row, ours), expected)
    if row.model != "bert":
        close(loss(tiny, row, ours), loss(tiny, row, reference))


@rows
def test_splice_folder_loads_in_peft_with_same_outputs(tiny, row, tmp_path):
    ours = splice_model(tiny, row)
    splice.save_adapter(ours, tmp_path / "splice")
    cfg = json.loads((tmp_path / "splice" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == row.peft_config().peft_type.value
    reference = peft.PeftModel.from_pretrained(tiny[row.model].build(), tmp_path / "splice").eval()
    close(output(tiny, row, ours), output(tiny, row, reference))


@rows
def test_same_encoder_weights_give_same_outputs(tiny, row):
    reference = peft_model(tiny, row)
    theirs = reference.prompt_encoder["default"].state_dict()
    ours = splice.adapt(tiny[row.model].build(), make_config(row.method, **row.fields)).eval()
    encoder = ours.splice_prompts.encoders["default"]
    assert encoder.state_dict().keys() == theirs.keys()
    encoder.load_state_dict(theirs)
    close(output(tiny, row, ours), output(tiny, row, reference))
    if row.model != "bert":
        close(loss(tiny, row, ours), loss(tiny, row, reference))


def word_tokenizer(path) -> str:
    """A word-level tokenizer of 20 ids, saved to `path` (ids fit the tiny models' vocabulary of 100)."""
    import helpers

    words = "classify the sentiment of this movie review as good or bad please".split()
    helpers.word_tokenizer(words, ("[PAD]", "[UNK]", "[CLS]", "[SEP]"), eos_token=None).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("init", ["SAMPLE_VOCAB", "TEXT"])
def test_prompt_tuning_inits_match_peft(tiny, tmp_path, init):
    """Same seed, same base → the same starting prompt: embeddings of the same sampled tokens, or of the text's
    tokens repeated to num_virtual_tokens."""
    text = dict(prompt_tuning_init_text="classify the sentiment", tokenizer_name_or_path=word_tokenizer(tmp_path / "t"))
    extra = text if init == "TEXT" else {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = peft.get_peft_model(tiny["bert"].build(), peft.PromptTuningConfig(
            task_type=FE, num_virtual_tokens=7, prompt_tuning_init=init, **extra))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ours = splice.adapt(tiny["bert"].build(), splice.PromptTuningConfig(
            num_virtual_tokens=7, prompt_tuning_init=init.lower(), **extra))
    start = ours.splice_prompts.encoders["default"].embedding.weight
    close(start, theirs.prompt_encoder["default"].embedding.weight)
    words = tiny["bert"].build().get_input_embeddings().weight
    if init == "TEXT":  # "classify the sentiment" → ids 4, 5, 6, repeated
        close(start, words[torch.tensor([4, 5, 6, 4, 5, 6, 4])])
    splice.save_adapter(ours, tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert cfg["prompt_tuning_init"] == init
    reference = peft.PeftModel.from_pretrained(tiny["bert"].build(), tmp_path / "saved").eval()
    close(output(tiny, ROWS[2], ours.eval()), output(tiny, ROWS[2], reference))
