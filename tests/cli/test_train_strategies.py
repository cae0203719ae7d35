"""`splice train --strategy NAME` (GaLore, LISA, HFT on full fine-tuning; ReLoRA on LoRA) on tiny models, the YAML
form, `splice strategies`, and their one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import cli, one_error_line
from transformers import AutoModel

import splice
from splice.train.data import load_classification_file
from splice.train.run import evaluate_saved

FAST = ["--epochs", "1", "--batch-size", "8", "--max-length", "8", "--no-progress"]


def test_full_fine_tuning_with_galore_saves_a_model_folder_that_scores_again(capsys, tmp_path, bert_dir,
                                                                            sentiment_csv):
    out = tmp_path / "model"
    code, stdout, err = cli(capsys, "train", bert_dir, sentiment_csv, "--out", out, "--method", "full",
                            "--strategy", "galore", "--strategy-option", "rank=2", "--strategy-option",
                            "update_proj_gap=5", "--lr", "1e-3", *FAST)
    assert code == 0, err
    assert "training full + galore" in stdout and "full + galore accuracy:" in stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "head.safetensors", "task.json"} <= \
        {p.name for p in out.iterdir()}
    accuracy = float(stdout.split("full + galore accuracy:")[1].split()[0])
    base, tuned = AutoModel.from_pretrained(bert_dir), AutoModel.from_pretrained(out)
    assert not torch.equal(base.encoder.layer[0].attention.self.query.weight,
                           tuned.encoder.layer[0].attention.self.query.weight)  # every weight trained
    ds = load_classification_file(sentiment_csv, "text", "label")
    from splice.train.data import split_train_eval

    _, held_out = split_train_eval(ds, 0.1, 0)
    assert evaluate_saved(str(bert_dir), out, held_out, progress=False) == pytest.approx(accuracy, abs=1e-6)


@pytest.mark.parametrize("strategy,options", [("lisa", ["layers=1", "interval=2"]), ("hft", ["interval=3"])])
def test_layer_strategies_train_a_few_steps(capsys, tmp_path, bert_dir, sentiment_csv, strategy, options):
    args = [a for o in options for a in ("--strategy-option", o)]
    code, stdout, err = cli(capsys, "train", bert_dir, sentiment_csv, "--out", tmp_path / "m", "--method", "full",
                            "--strategy", strategy, *args, "--max-steps", "4", *FAST)
    assert code == 0, err
    assert f"full + {strategy} accuracy:" in stdout and "(4 steps" in stdout


def test_relora_from_yaml_saves_the_sum_of_its_cycles_as_one_lora(capsys, tmp_path, bert_dir, sentiment_csv):
    config = tmp_path / "train.yaml"
    config.write_text("method: lora\nadapter: {r: 2, target_modules: [query, value]}\n"
                      "train: {strategy: relora, relora: {interval: 3, warmup: 1}, max_steps: 7}\n")
    out = tmp_path / "adapter"
    code, stdout, err = cli(capsys, "train", bert_dir, sentiment_csv, "-o", out, "-c", config, "--lr", "1e-2",
                            *FAST)
    assert code == 0, err
    assert "lora + relora accuracy:" in stdout
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 6  # restarts after steps 3 and 6: three cycles of rank 2
    assert cfg["lora_alpha"] == pytest.approx(3 * 8)  # s = 8 / 2 kept (LoraConfig's default alpha 8)
    splice.load_adapter(AutoModel.from_pretrained(bert_dir), out)  # loads against the original base


def test_strategies_lists_every_strategy_with_its_options(capsys):
    code, stdout, _ = cli(capsys, "strategies")
    assert code == 0
    for name in ("galore", "lisa", "hft", "relora"):
        assert f"{name}  (https://arxiv.org/abs/" in stdout
    assert "update_proj_gap:" in stdout and "Example" in cli(capsys, "strategies", "--help")[1]
    assert "--strategy-option" in cli(capsys, "train", "--help")[1]


@pytest.mark.parametrize("args,expect", [
    (["--strategy", "galor"], "unknown training strategy 'galor' (did you mean 'galore'"),
    (["--method", "full", "--strategy", "galore", "--strategy-option", "rank"], "expected KEY=VALUE"),
    (["--method", "full", "--strategy", "lisa", "--strategy-option", "layer=1"], "unknown config key 'layer'"),
    (["--method", "full", "--strategy", "galore", "--strategy-option", "rank=0"], "galore rank: must be a positive"),
    (["--method", "full", "--r", "4"], "--method full trains every weight; adapter options do not apply: --r"),
    (["--method", "full", "--strategy", "relora"], "--strategy relora merges and restarts a LoRA adapter; it needs "
                                                   "--method lora, not full"),
    (["--strategy-option", "rank=2"], "strategy_options: given without a strategy"),
])
def test_strategy_errors_are_one_line(capsys, tmp_path, bert_dir, sentiment_csv, args, expect):
    out = tmp_path / "o"
    code, _, err = cli(capsys, "train", bert_dir, sentiment_csv, "--out", out, *args, *FAST)
    assert code != 0
    assert expect in one_error_line(err)
    assert not out.exists()
