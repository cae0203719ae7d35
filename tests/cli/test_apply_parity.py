"""`splice apply` (streaming, from files) equals PEFT's `merge_and_unload` on adapters PEFT itself wrote."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

from splice.apply import apply_adapter


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_apply_equals_peft_merge_and_unload(tmp_path, bert_dir, gpt2_dir, arch, use_dora):
    base_dir, auto = (bert_dir, AutoModel) if arch == "bert" else (gpt2_dir, AutoModelForCausalLM)
    targets = ["query", "value", "dense"] if arch == "bert" else ["c_attn", "c_proj"]
    torch.manual_seed(3)
    peft_model = get_peft_model(auto.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora,
                                           fan_in_fan_out=arch == "gpt2"))
    with torch.no_grad():  # move B (and m) away from their identity initialisation
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = peft_model.merge_and_unload().state_dict()

    out = apply_adapter(str(base_dir), tmp_path / "adapter", tmp_path / "merged", progress=False)
    got = load_file(out / "model.safetensors")
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=0, msg=name)
    changed = [n for n in got if not torch.equal(got[n], load_file(base_dir / "model.safetensors").get(n, got[n]))]
    assert changed, "the adapter changed nothing"


@pytest.mark.parametrize("method", ["nola", "dylora", "sorsa"])
def test_apply_of_a_splice_only_method_on_gpt2_conv1d_equals_its_merge(tmp_path, gpt2_dir, method):
    # Methods PEFT lacks wrote no fan_in_fan_out, so apply read GPT-2's (in, out) weights as (out, in): nola came
    # out silently wrong, the others were refused with a shape error.
    import splice

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    splice.adapt(model, splice.adapters.make_config(method, target_modules=["c_attn", "c_fc"]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in splice.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    splice.save_adapter(model, tmp_path / "adapter")
    expected = splice.merge_and_unload(model).state_dict()
    out = apply_adapter(str(gpt2_dir), tmp_path / "adapter", tmp_path / "merged", progress=False)
    got = load_file(out / "model.safetensors")
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=0, msg=name)


def test_a_peft_folder_carrying_its_embedding_base_loads_and_applies(tmp_path):
    # PEFT saves a targeted embed_tokens' base weight beside the adapter (save_embedding_layers="auto"); splice
    # refused such folders as holding an unknown tensor.
    import splice
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1,
                                            max_position_embeddings=32)).eval()

    llama().save_pretrained(tmp_path / "base")
    model = get_peft_model(llama(), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / "adapter")
    assert any(k.endswith("embed_tokens.base_layer.weight")
               for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    x = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        want = model(input_ids=x).logits
        got = splice.load_adapter(llama(), tmp_path / "adapter")(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    out = apply_adapter(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "merged", progress=False,
                        dtype=torch.bfloat16)
    expected = PeftModel.from_pretrained(llama(), tmp_path / "adapter").merge_and_unload().state_dict()
    for name, tensor in load_file(out / "model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name].to(torch.bfloat16), atol=0, rtol=0, msg=name)
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16  # config.json says so too
    other = llama()
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(1.0)  # not the base the folder carries
    with pytest.raises(splice.SpliceError, match="carries its own base weight for 'model.embed_tokens'"):
        splice.load_adapter(other, tmp_path / "adapter")


def test_apply_computes_a_weight_sized_update_one_module_at_a_time(tmp_path, bert_dir, monkeypatch):
    """Past the budget of kept updates (here 0 bytes), an update computed from the base weight (IA3 with biases:
    weight and bias of a module) is computed once to check it and once more when its tensors are written, a module
    at a time, never held for the whole model."""
    import splice
    import splice.apply as apply_module
    from splice.io.checkpoints import CheckpointReader
    from splice.io.peft_format import read_adapter_folder

    model = AutoModel.from_pretrained(bert_dir).eval()
    splice.adapt(model, splice.IA3Config(target_modules=["query", "value", "output.dense"]))
    with torch.no_grad():
        for p in splice.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    splice.save_adapter(model, tmp_path / "adapter")
    expected = splice.merge_and_unload(model).state_dict()

    monkeypatch.setattr(apply_module, "KEEP_COMPUTED_BYTES", 0)
    calls = []
    real = apply_module._method_delta
    monkeypatch.setattr(apply_module, "_method_delta", lambda folder, prepared, src, *a: calls.append(src) or
                        real(folder, prepared, src, *a))
    reader = CheckpointReader(bert_dir)
    deltas = apply_module.adapter_deltaset(read_adapter_folder(tmp_path / "adapter"), reader)
    modules = list(dict.fromkeys(calls))
    assert calls == modules and len(modules) == 8  # checked once each: 2 layers x (query, value, 2 output.dense)
    assert {n.rsplit(".", 1)[-1] for n in deltas} == {"weight", "bias"}  # IA3 rescales an output's bias too
    calls.clear()
    for name in deltas:  # in order, as `apply` reads them: weight then bias of one module, then the next
        deltas[name].apply_to(w := reader.get(name).to(torch.float32, copy=True))
        torch.testing.assert_close(w, expected[name], atol=1e-5, rtol=0, msg=name)
    assert calls == modules  # once more each, as its tensors are read
    out = apply_adapter(str(bert_dir), tmp_path / "adapter", tmp_path / "merged", progress=False)
    for name, tensor in load_file(out / "model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=0, msg=name)
    from splice.merge import merge

    calls.clear()  # 4 merge workers read modules interleaved; each module is kept until all its tensors are read
    config = {"merge_method": "task_arithmetic", "base_model": str(bert_dir),
              "models": [{"model": str(tmp_path / "adapter"), "parameters": {"weight": 1.0}}]}
    merged = merge(config, tmp_path / "merge", progress=False, workers=4)
    assert sorted(calls) == sorted(modules * 2)  # checked once, then read once
    for name, tensor in load_file(merged / "model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=0, msg=name)
    monkeypatch.setattr(apply_module, "KEEP_COMPUTED_BYTES", 1 << 30)  # within the budget: computed once, kept
    calls.clear()
    deltas = apply_module.adapter_deltaset(read_adapter_folder(tmp_path / "adapter"), reader)
    for name in deltas:
        deltas[name]
    assert calls == modules
