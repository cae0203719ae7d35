"""An adapted HF model is still the user's HF model: `generate`, `torch.compile` and `transformers.Trainer` work."""
from __future__ import annotations

import pytest
import torch
from helpers import train_with_hf_trainer
from torch._dynamo.testing import CompileCounterWithBackend

import splice


@torch.no_grad()
def randomise_b(model) -> None:
    """B ≠ 0 (and DoRA's magnitude ≠ ‖W‖), so that the adapter changes the model."""
    g = torch.Generator().manual_seed(0)
    for p in splice.trainable_parameters(model):
        p.add_(torch.randn(p.shape, generator=g) * 0.3 * max(p.abs().mean().item(), 0.3))


def test_generate_greedy_matches_a_manual_greedy_loop(llama, tokens):
    splice.adapt(llama, splice.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomise_b(llama)
    prompt = tokens["input_ids"][:2]
    out = llama.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                         do_sample=False, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(4):  # the same greedy decode without the KV cache, through the adapted forward
            ids = torch.cat([ids, llama(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)
    with splice.disable_adapters(llama):
        base = llama.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                              do_sample=False, pad_token_id=0)
    assert not torch.equal(out, base)  # the adapter takes part in generation


def test_torch_compile_aot_eager_matches_eager(llama, tokens):
    splice.adapt(llama, splice.DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomise_b(llama)
    llama.train()  # dropout is 0 everywhere: train mode only makes autograd record
    params = splice.trainable_parameters(llama)

    def step(model):
        loss = model(**tokens, labels=tokens["input_ids"]).loss
        grads = torch.autograd.grad(loss, params)
        return loss.detach(), grads

    eager_loss, eager_grads = step(llama)
    counter = CompileCounterWithBackend("aot_eager")
    # fullgraph: the adapter layers and the fused autograd.Function trace without a graph break
    compiled = torch.compile(llama, backend=counter, fullgraph=True)
    try:
        loss, grads = step(compiled)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_trainer_trains_only_the_adapter(llama, tmp_path):
    splice.adapt(llama, splice.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trained = train_with_hf_trainer(llama, tmp_path)
    assert trained and all("lora_" in n for n in trained)


def test_wrapped_modules_answer_for_the_module_they_wrap(tiny):
    """HF code reads `get_input_embeddings().weight`, `in_features`, ...: the wrapper must answer for the base."""
    import splice

    model = tiny["llama"].build(seed=0)
    emb = model.get_input_embeddings()
    splice.adapt(model, splice.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    wrapped = model.get_input_embeddings()
    assert wrapped is not emb and wrapped.weight is emb.weight and wrapped.padding_idx == emb.padding_idx
    q = model.model.layers[0].self_attn.q_proj
    assert q.in_features == q.base.in_features and q.weight is q.base.weight
    with pytest.raises(AttributeError):
        q.no_such_attribute
