"""An adapted HF model is still the user's HF model: `generate`, `torch.compile` and `transformers.Trainer` work."""
from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

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
    compiled = torch.compile(llama, backend="aot_eager", fullgraph=False)
    loss, grads = step(compiled)
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_trainer_trains_only_the_adapter(llama, tmp_path):
    splice.adapt(llama, splice.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    base = {n: p.detach().clone() for n, p in llama.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in llama.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n for n in adapter)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 100, (4, 6), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, learning_rate=1e-2, save_strategy="no", logging_strategy="no")
    Trainer(model=llama, args=args, train_dataset=data).train()
    now = dict(llama.named_parameters())
    for n, before in adapter.items():
        assert not torch.equal(now[n], before), f"{n} did not train"
    for n, before in base.items():
        assert torch.equal(now[n], before), f"base weight {n} changed"
        assert not now[n].requires_grad
