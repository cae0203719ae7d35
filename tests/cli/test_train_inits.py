"""`splice train --init eva|lora_ga|corda`: the data-driven LoRA inits computed from the first training batches."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from helpers import cli
from transformers import AutoModelForCausalLM

import splice

FAST = ["--epochs", "2", "--batch-size", "8", "--max-length", "8", "--no-progress"]


@pytest.mark.parametrize("init", ["eva", "lora_ga", "corda"])
def test_train_causal_lm_with_a_data_driven_init(capsys, tmp_path, gpt2_dir, pairs_jsonl, init):
    out = tmp_path / init
    code, stdout, err = cli(capsys, "train", gpt2_dir, pairs_jsonl, "--out", out, "--r", 2, "--init", init,
                            "--target-modules", "c_attn,c_fc", "--lr", "0.01", *FAST)
    assert code == 0, err
    before = float(stdout.split("base perplexity:")[1].split()[0])
    after = float(stdout.split("lora perplexity:")[1].split()[0])
    assert after < before
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    if init != "eva":  # the start is subtracted: saved as a plain LoRA of rank 2r against the untouched base
        assert cfg["r"] == 4
    # the folder means the same model in splice and in PEFT
    x = torch.randint(0, 32, (2, 6))
    ours = splice.load_adapter(AutoModelForCausalLM.from_pretrained(gpt2_dir).eval(), out)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_dir), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-5, rtol=0)


def test_train_classification_with_eva(capsys, tmp_path, bert_dir, sentiment_csv):
    code, stdout, err = cli(capsys, "train", bert_dir, sentiment_csv, "--out", tmp_path / "eva", "--r", 2,
                            "--init", "eva", "--target-modules", "query,value", "--lr", "0.01", *FAST)
    assert code == 0, err
    assert "frozen probe accuracy:" in stdout and "lora accuracy:" in stdout


def test_data_driven_init_errors_are_one_line():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(splice.SpliceError, match="^init_lora_weights: eva is data-driven; pass calibration"):
        splice.adapt(model, splice.LoraConfig(r=2, target_modules=["0"], init_lora_weights="eva"))
    with pytest.raises(splice.SpliceError, match="^calibration data given, but init_lora_weights='kaiming'"):
        splice.adapt(model, splice.LoraConfig(r=2, target_modules=["0"]), calibration=[{}])
    with pytest.raises(splice.SpliceError, match="^r: lora_ga needs 2r ≤ min"):
        splice.adapt(model, splice.LoraConfig(r=3, target_modules=["0"], init_lora_weights="lora_ga"),
                     calibration=[torch.randn(2, 4)], calibration_loss=lambda b: model(b).sum())
    with pytest.raises(splice.SpliceError, match="^eva_config.rho: must be >= 1"):
        splice.LoraConfig(init_lora_weights="eva", eva_config={"rho": 0.5})
    with pytest.raises(splice.SpliceError, match="^unknown config key 'tau' for eva_config"):
        splice.LoraConfig(init_lora_weights="eva", eva_config={"tau": 0.9})
    assert isinstance(model[0], torch.nn.Linear) and all(p.requires_grad for p in model.parameters())
