"""The contract for prompt methods (virtual tokens, no weight delta), one row per (method, model, config).

The weight-delta matrix (test_contract.py) covers every other method; this file covers every registered method
whose config is a `PromptConfig`. Before any check the prompt's parameters are randomised. Tolerances (fp32):
exact equality where the computation is the base's own (disabled, deleted); 1e-5 absolute where the same weights
run through another path (save → load, two adapters).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from helpers import train_with_hf_trainer
from torch import nn

import splice
from splice.adapters import get_method, make_config
from splice.adapters.prompts import PromptConfig
from splice.adapters.registry import method_names

ATOL = 1e-5


@dataclass(frozen=True)
class Row:
    id: str
    model: str  # a key of conftest.TINY
    method: str
    fields: dict[str, Any] = field(default_factory=dict)

    def config(self):
        return make_config(self.method, **copy.deepcopy(self.fields))


ROWS = [
    Row("prompt-tuning-llama", "llama", "prompt_tuning", dict(num_virtual_tokens=4)),
    Row("prompt-tuning-gpt2-sample-vocab", "gpt2", "prompt_tuning",
        dict(num_virtual_tokens=3, prompt_tuning_init="sample_vocab")),
    Row("prompt-tuning-bert", "bert", "prompt_tuning", dict(num_virtual_tokens=5)),
    Row("prefix-tuning-llama-gqa", "llama", "prefix_tuning", dict(num_virtual_tokens=4)),
    Row("prefix-tuning-gpt2-projection", "gpt2", "prefix_tuning",
        dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)),
    Row("prefix-tuning-bert", "bert", "prefix_tuning", dict(num_virtual_tokens=2)),
    Row("p-tuning-llama-mlp", "llama", "p_tuning", dict(num_virtual_tokens=4, encoder_hidden_size=24)),
    Row("p-tuning-bert-lstm", "bert", "p_tuning", dict(num_virtual_tokens=3, encoder_reparameterization_type="LSTM")),
]
rows = pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])


def test_every_prompt_method_has_a_row():
    prompts = {m for m in method_names() if issubclass(get_method(m).config, PromptConfig)}
    assert prompts and {r.method for r in ROWS} == prompts


# -- helpers -------------------------------------------------------------------------------------------------------
def batch(tiny, row: Row, rows: int = 3) -> dict[str, torch.Tensor]:
    b = tiny[row.model].batch(rows=rows)
    mask = torch.ones_like(b["input_ids"])
    mask[1, -2:] = 0
    return {**b, "attention_mask": mask}


def output(tiny, row: Row, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch(tiny, row))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def real(out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The outputs at the real tokens (prompt and P-tuning put theirs first)."""
    return out[:, out.shape[1] - base.shape[1]:]


@torch.no_grad()
def add_adapter(model: nn.Module, row: Row, name: str = "default", seed: int = 1) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        splice.adapt(model, row.config(), name)
    g = torch.Generator().manual_seed(seed)
    params = splice.trainable_parameters(model, name)
    assert params
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * 0.5 * max(p.abs().mean().item(), 0.1))
    return model


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- the contract --------------------------------------------------------------------------------------------------
@rows
def test_adapter_changes_outputs_and_model_stays_in_eval(tiny, row):
    fam = tiny[row.model]
    base = output(tiny, row, fam.build())
    model = add_adapter(fam.build(), row)
    assert not any(m.training for m in model.modules())
    out = output(tiny, row, model)
    n = row.fields["num_virtual_tokens"] if get_method(row.method).config.kind == "embeds" else 0
    assert out.shape[1] == base.shape[1] + n
    assert (real(out, base) - base).abs().max() > 1e-3
    assert splice.active_adapters(model) == ["default"]
    assert type(model) is type(fam.build())  # the user's model class, not a wrapper


@rows
def test_save_load_gives_identical_outputs(tiny, row, tmp_path):
    fam = tiny[row.model]
    model = add_adapter(fam.build(), row)
    path = splice.save_adapter(model, tmp_path / "adapter")
    fresh = splice.load_adapter(fam.build(), path)
    close(output(tiny, row, fresh), output(tiny, row, model))
    assert not any(p.requires_grad for p in fresh.parameters())
    assert not any(m.training for m in fresh.modules())
    trainable = splice.load_adapter(fam.build(), path, is_trainable=True)
    want = {id(p) for p in splice.trainable_parameters(trainable, "default")}
    assert want and want == {id(p) for p in trainable.parameters() if p.requires_grad}
    # saved again from the loaded table: the same folder content
    again = splice.save_adapter(trainable, tmp_path / "again")
    close(output(tiny, row, splice.load_adapter(fam.build(), again)), output(tiny, row, model))


@rows
def test_disabled_adapters_give_exact_base_outputs(tiny, row):
    fam = tiny[row.model]
    base = output(tiny, row, fam.build())
    model = add_adapter(fam.build(), row)
    with splice.disable_adapters(model):
        assert torch.equal(output(tiny, row, model), base)
    assert (real(output(tiny, row, model), base) - base).abs().max() > 1e-3


@rows
def test_two_adapters_each_give_their_own_outputs(tiny, row):
    fam = tiny[row.model]
    model = add_adapter(add_adapter(fam.build(), row, "a", seed=1), row, "b", seed=2)
    only_a = output(tiny, row, add_adapter(fam.build(), row, "a", seed=1))
    only_b = output(tiny, row, add_adapter(fam.build(), row, "b", seed=2))
    assert (only_a - only_b).abs().max() > 1e-3
    assert splice.active_adapters(model) == ["b"]
    close(output(tiny, row, model), only_b)
    splice.set_adapter(model, "a")
    close(output(tiny, row, model), only_a)
    with pytest.raises(splice.SpliceError, match="only one prompt adapter can be active"):
        splice.set_adapter(model, ["a", "b"])
    splice.delete_adapter(model, "b")
    assert splice.active_adapters(model) == ["a"]
    close(output(tiny, row, model), only_a)


@rows
def test_backward_reaches_exactly_the_prompt_parameters(tiny, row):
    fam = tiny[row.model]
    model = add_adapter(fam.build(), row)
    model.train()
    out = model(**batch(tiny, row))
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    prompt = splice.trainable_parameters(model, "default")
    assert {id(p) for p in prompt} == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in model.parameters() if p.grad is not None} == {id(p) for p in prompt}
    for p in prompt:
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0


@rows
def test_delete_restores_the_plain_model(tiny, row):
    fam = tiny[row.model]
    model = fam.build()
    keys, base = set(model.state_dict()), output(tiny, row, model)
    add_adapter(model, row)
    splice.delete_adapter(model, "default")
    assert set(model.state_dict()) == keys and not model._forward_pre_hooks
    assert torch.equal(output(tiny, row, model), base)
    assert splice.active_adapters(model) == []


@rows
def test_weight_delta_operations_refuse_with_one_line(tiny, row, tmp_path):
    model = add_adapter(tiny[row.model].build(), row)
    before = state(model)
    for op in (splice.merge_adapter, splice.unmerge_adapter, splice.get_delta, splice.merge_and_unload):
        with pytest.raises(splice.SpliceError) as info:
            op(model, "default")
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"{row.method} adds virtual") and "no weight delta" in msg
    with pytest.raises(splice.SpliceError, match="mixed batches"):
        with splice.mixed_batch(model, ["default", None, None]):
            pass
    for k, v in state(model).items():
        assert torch.equal(v, before[k])
    path = splice.save_adapter(model, tmp_path / "adapter")
    from splice.io.peft_format import read_adapter_folder  # what apply and merge read an adapter with

    with pytest.raises(splice.SpliceError, match=f"{row.method} adds virtual .*no weight delta to merge$"):
        read_adapter_folder(path)


def test_prompt_and_lora_adapters_combine_and_save_separately(tiny, tmp_path):
    """A LoRA and a prompt adapter active together: each saved alone, both loaded back, the same outputs."""
    fam = tiny["llama"]
    row = ROWS[0]
    model = add_adapter(fam.build(), row, "prompt")
    splice.adapt(model, splice.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "lora")
    with torch.no_grad():
        for p in splice.trainable_parameters(model, "lora"):
            p.add_(0.1)
    splice.set_adapter(model, ["prompt", "lora"])
    assert splice.active_adapters(model) == ["prompt", "lora"]
    both = output(tiny, row, model)
    splice.set_adapter(model, "prompt")
    assert (output(tiny, row, model) - both).abs().max() > 1e-3
    splice.save_adapter(model, tmp_path / "p", "prompt")
    splice.save_adapter(model, tmp_path / "l", "lora")
    fresh = splice.load_adapter(splice.load_adapter(fam.build(), tmp_path / "p", "prompt"), tmp_path / "l", "lora")
    splice.set_adapter(fresh, ["prompt", "lora"])
    close(output(tiny, row, fresh), both)


def test_loading_into_another_base_or_shape_is_refused(tiny, tmp_path):
    row = ROWS[0]
    path = splice.save_adapter(add_adapter(tiny["llama"].build(), row), tmp_path / "adapter")
    with pytest.raises(splice.SpliceError, match="made for another base model"):
        splice.load_adapter(tiny["llama"].build(seed=1), path)
    with pytest.raises(splice.SpliceError, match="token_dim is 32 but the base model has 48"):
        splice.load_adapter(tiny["llama"].build(hidden=48), path)


class NoCache(nn.Module):
    """A model with a transformers config whose forward takes no KV cache."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(4, 4)

    def forward(self, input_ids):
        return self.proj(input_ids)


def test_models_prompt_methods_cannot_use_are_refused_before_any_change(tiny):
    with pytest.raises(splice.SpliceError, match="^prompt methods need a transformers model with a config"):
        splice.adapt(nn.Linear(2, 2), make_config("prompt_tuning"))
    model = NoCache(tiny["llama"].build().config)
    with pytest.raises(splice.SpliceError, match="^prefix_tuning needs a model that takes a KV cache"):
        splice.adapt(model, make_config("prefix_tuning"))
    with pytest.raises(splice.SpliceError, match="^prompt_tuning needs the model's input embeddings"):
        splice.adapt(model, make_config("prompt_tuning"))
    assert all(p.requires_grad for p in model.parameters()) and not model._forward_pre_hooks
    assert splice.active_adapters(model) == []


@pytest.mark.parametrize("row", [ROWS[0], ROWS[3]], ids=[ROWS[0].id, ROWS[3].id])  # llama: prompt, prefix
def test_generate_with_a_kv_cache_is_refused_in_one_line(tiny, row):
    model = add_adapter(tiny[row.model].build(), row)
    ids = tiny[row.model].batch(rows=1)["input_ids"]
    with pytest.raises(splice.SpliceError, match="given a KV cache .*not supported yet$"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       pad_token_id=0)


def test_trainer_trains_only_the_prompt(tiny, tmp_path):
    """transformers.Trainer on the user's own model class: labels are extended through the hook like the inputs."""
    model = splice.adapt(tiny["llama"].build(), make_config("prompt_tuning", num_virtual_tokens=3))
    assert list(train_with_hf_trainer(model, tmp_path)) == ["splice_prompts.encoders.default.embedding.weight"]


def test_prompt_tuning_leaves_classifier_labels_alone_and_a_bad_name_is_one_line(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=2))
    splice.adapt(model, make_config("prompt_tuning", num_virtual_tokens=3))
    out = model(input_ids=torch.randint(3, 40, (2, 6)), labels=torch.tensor([0, 1]))  # (rows,): a crash before
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)
    splice.save_adapter(model, tmp_path / "p")
    with pytest.raises(splice.SpliceError, match="adapter name 'a.b': use letters"):
        splice.load_adapter(model, tmp_path / "p", "a.b")


def test_p_tuning_saves_its_tokens_without_encoder_dropout(tiny, tmp_path):
    model = tiny["bert"].build()
    splice.adapt(model, make_config("p_tuning", num_virtual_tokens=3, encoder_reparameterization_type="LSTM",
                                    encoder_dropout=0.5))
    model.train()  # right after training: the LSTM encoder's dropout is on
    splice.save_adapter(model, tmp_path / "p")
    model.eval()
    loaded = splice.load_adapter(tiny["bert"].build().eval(), tmp_path / "p")
    x = torch.randint(3, 40, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).last_hidden_state, model(input_ids=x).last_hidden_state,
                                   atol=1e-5, rtol=0)
