"""`splice train --method lora_sb`: the registry makes every method trainable from the CLI; LoRA-SB also shows that
a method's own data-driven start gets the first training batches (`needs_calibration`), as LoRA's inits do."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from splice.cli import run

FAST = ["--epochs", "2", "--batch-size", "8", "--max-length", "8", "--no-progress"]


@pytest.mark.parametrize("init, gradient_start", [(None, True), ("svd", False)])
def test_train_classification_with_lora_sb(capsys, tmp_path, bert_dir, sentiment_csv, init, gradient_start):
    out = tmp_path / "lora_sb"
    extra = ["--init", init] if init else []
    capsys.readouterr()
    code = run([str(a) for a in ("train", bert_dir, sentiment_csv, "--out", out, "--method", "lora_sb", "--r", 2,
                                 "--target-modules", "query,value", "--lr", "0.01", *extra, *FAST)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "frozen probe accuracy:" in stdout and "lora_sb accuracy:" in stdout
    assert "training lora_sb (16 parameters)" in stdout  # r² per module, 4 modules
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] is None and cfg["splice_method"] == "lora_sb"
    assert cfg["init_weights"] == (init or "auto")
    starts = [t for k, t in load_file(out / "adapter_model.safetensors").items() if k.endswith("lora_sb_R0")]
    assert len(starts) == 4 and all(bool(t.any()) == gradient_start for t in starts)
