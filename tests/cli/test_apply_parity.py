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
