"""Edges of the adapter core where splice once differed from PEFT or left a model half-changed: targets inside
`modules_to_save`, out-of-order unmerges, tied weights, a wrapped output head under all-linear, refused loads."""
from __future__ import annotations

import peft
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForSequenceClassification

import splice
from splice.adapters.inject import adapter_layers
from splice.errors import SpliceError


def roberta(num_labels: int = 3) -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40, num_labels=num_labels)
    return RobertaForSequenceClassification(cfg).eval()


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.2, names: tuple[str, ...] = ("default",)) -> None:
    g = torch.Generator().manual_seed(1)
    for name in names:
        for p in splice.trainable_parameters(model, name):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def state(model: nn.Module) -> tuple[dict[str, type], dict[str, bool]]:
    return ({n: type(m) for n, m in model.named_modules()}, {n: p.requires_grad for n, p in model.named_parameters()})


def test_modules_to_save_are_not_also_wrapped_and_the_folder_loads_in_peft(tmp_path):
    # RoBERTa's head holds Linears (dense, out_proj) that all-linear would wrap inside the module saved whole.
    model = splice.adapt(roberta(), splice.LoraConfig(r=2, target_modules="all-linear", modules_to_save=["classifier"]))
    layers = [n for n, _ in adapter_layers(model)]
    assert "classifier" in layers and not [n for n in layers if n.startswith("classifier.")]
    perturb(model)
    splice.save_adapter(model, tmp_path / "a")
    x = torch.randint(3, 64, (2, 7))
    theirs = peft.PeftModel.from_pretrained(roberta(), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5, rtol=0)


def test_a_refused_load_leaves_the_model_as_it_was(tmp_path):
    model = splice.adapt(roberta(3), splice.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    splice.save_adapter(model, tmp_path / "a")
    other = roberta(2)  # a head of another size: refused before anything is wrapped or frozen
    before = state(other)
    with pytest.raises(SpliceError, match=r"tensor 'out_proj.(weight|bias)' of module 'classifier' has shape \(3"):
        splice.load_adapter(other, tmp_path / "a")
    assert state(other) == before and splice.adapters.model.configs(other) == {}
    with pytest.raises(SpliceError, match="adapter name 'v1.2': use letters"):
        splice.load_adapter(other, tmp_path / "a", "v1.2")
    assert state(other) == before
    same = roberta(3)
    splice.load_adapter(same, tmp_path / "a", "v1")  # and a good load still works afterwards
    assert splice.adapters.model.configs(same).keys() == {"v1"}


def test_unmerging_in_any_order_restores_the_base():
    # DoRA's unmerge divides by the column norms it saw when merging: merged after it, the LoRA must come out first.
    lin = nn.Linear(16, 16)
    model = nn.Sequential()
    model.add_module("proj", lin)
    w0 = lin.weight.detach().clone()
    splice.adapt(model, splice.DoraConfig(r=2, target_modules=["proj"]), "d")
    splice.adapt(model, splice.LoraConfig(r=2, target_modules=["proj"]), "l")
    perturb(model, 0.2, ("d", "l"))
    x = torch.randn(4, 16)
    splice.set_adapter(model, ["d", "l"])
    with torch.no_grad():
        want = model(x)
        splice.merge_adapter(model, "d")
        splice.merge_adapter(model, "l")
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
        splice.unmerge_adapter(model, "d")  # out of order
        splice.unmerge_adapter(model, "l")
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)  # both running unmerged again
    torch.testing.assert_close(model.proj.base.weight, w0, atol=1e-5, rtol=0)


def test_merging_into_a_tied_weight_is_refused_until_untied():
    model = splice.adapt(gpt2(), splice.LoraConfig(r=2, target_modules=["lm_head"]))
    perturb(model)
    x = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        want = model(input_ids=x).logits
    with pytest.raises(SpliceError, match=r"lm_head.weight is tied to transformer.wte.weight.*untie them first"):
        splice.merge_adapter(model, "default")  # it would also change the input embedding
    head = model.lm_head.base
    head.weight = nn.Parameter(head.weight.detach().clone())
    splice.merge_adapter(model, "default")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, want, atol=1e-5, rtol=0)


def test_all_linear_leaves_out_an_output_head_that_an_earlier_adapter_wrapped():
    model = splice.adapt(gpt2(), splice.LoraConfig(r=2, target_modules=["lm_head"]), "a")
    splice.adapt(model, splice.LoraConfig(r=2, target_modules="ALL-LINEAR"), "b")  # any case, as PEFT reads it
    assert "b" not in model.lm_head.adapters and "a" in model.lm_head.adapters
    assert "b" in model.transformer.h[0].attn.c_attn.adapters


def test_a_nested_mixed_batch_gives_the_outer_groups_back_and_merging_inside_is_refused():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(8, 8))
    for name in ("a", "b"):
        splice.adapt(model, splice.LoraConfig(r=2, target_modules=["proj"]), name)
        perturb(model, 0.5, (name,))
    x = torch.randn(2, 8)
    with torch.no_grad():
        with splice.mixed_batch(model, ["a", "b"]):
            want = model(x)
            with splice.mixed_batch(model, ["b"]):
                model(x[:1])
            torch.testing.assert_close(model(x), want)  # the outer rows, not the active adapter on every row
            with pytest.raises(SpliceError, match="cannot merge adapter 'a' inside a mixed_batch block"):
                splice.merge_adapter(model, "a")


def test_modules_to_save_on_a_decoder_layer_gets_its_call_arguments():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    x = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        want = model(input_ids=x).logits
    splice.adapt(model, splice.LoraConfig(r=2, target_modules=["lm_head"], modules_to_save=["layers.0"]))
    with torch.no_grad():  # the layer's position embeddings reach the copy (a TypeError before)
        torch.testing.assert_close(model(input_ids=x).logits, want, atol=1e-5, rtol=0)
