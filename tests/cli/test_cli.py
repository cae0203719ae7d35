"""`splice train / apply / inspect` end to end on tiny models, and their one-line errors."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import cli, one_error_line
from safetensors.torch import load_file
from transformers import AutoModel

import splice

FAST = ["--epochs", "2", "--batch-size", "8", "--max-length", "8", "--no-progress"]


def test_train_classification_then_apply_and_inspect(capsys, tmp_path, bert_dir, sentiment_csv):
    out = tmp_path / "adapter"
    code, stdout, _ = cli(capsys, "train", bert_dir, sentiment_csv, "--out", out, "--r", 4,
                          "--target-modules", "query,value", "--lr", "0.01", *FAST)
    assert code == 0, stdout
    assert "frozen probe accuracy:" in stdout and "lora accuracy:" in stdout
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "task.json"} <= \
        {p.name for p in out.iterdir()}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["query", "value"]

    # apply: a complete HF folder whose model equals base + adapter
    merged = tmp_path / "merged"
    code, stdout, _ = cli(capsys, "apply", bert_dir, out, merged, "--no-progress")
    assert code == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in merged.iterdir()}
    x = torch.randint(0, 32, (3, 6))
    adapted = splice.load_adapter(AutoModel.from_pretrained(bert_dir).eval(), out)
    full = AutoModel.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=x).last_hidden_state, adapted(input_ids=x).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)

    code, stdout, _ = cli(capsys, "inspect", out)
    assert code == 0 and "lora" in stdout and "wrapped_modules" in stdout
    code, stdout, _ = cli(capsys, "inspect", merged, "--json")
    info = json.loads(stdout)
    assert info["kind"] == "model" and info["architecture"] == "BertModel" and info["tokenizer"] is True


def test_alpha_flag_reaches_a_method_whose_field_is_alpha(capsys, tmp_path, bert_dir, sentiment_csv):
    code, _, err = cli(capsys, "train", bert_dir, sentiment_csv, "--out", tmp_path / "k", "--method", "lokr",
                       "--r", 2, "--alpha", 6, "--max-steps", 1, "--batch-size", 8, "--max-length", 8, "--no-progress")
    assert code == 0, err
    cfg = json.loads((tmp_path / "k" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOKR" and cfg["r"] == 2 and cfg["alpha"] == 6


def test_train_from_yaml_with_dora(capsys, tmp_path, bert_dir, sentiment_csv):
    config = tmp_path / "train.yaml"
    config.write_text("method: dora\nadapter: {r: 2, lora_alpha: 4, target_modules: all-linear}\n"
                      "train: {epochs: 1, batch_size: 8, max_length: 8}\n")
    code, stdout, err = cli(capsys, "train", bert_dir, sentiment_csv, "-o", tmp_path / "d", "-c", config,
                            "--no-progress")
    assert code == 0, err
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["r"] == 2 and cfg["target_modules"] == "all-linear"
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(tmp_path / "d" / "adapter_model.safetensors"))


def test_train_causal_lm(capsys, tmp_path, gpt2_dir, pairs_jsonl):
    code, stdout, err = cli(capsys, "train", gpt2_dir, pairs_jsonl, "--out", tmp_path / "lm", "--r", 2,
                            "--target-modules", "c_attn", "--lr", "0.01", *FAST)
    assert code == 0, err
    assert "base perplexity:" in stdout and "lora perplexity:" in stdout
    before = float(stdout.split("base perplexity:")[1].split()[0])
    after = float(stdout.split("lora perplexity:")[1].split()[0])
    assert after < before  # the completions are learnable from the prompt
    assert json.loads((tmp_path / "lm" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_help_has_examples(capsys):
    for command in ("train", "apply", "inspect", "quickstart", "methods", "merge", "compress", "extract", "serve",
                    "strategies", "bench"):
        code, stdout, _ = cli(capsys, command, "--help")
        assert code == 0 and "Example" in stdout, command
    _, serve, _ = cli(capsys, "serve", "--help")  # its curl works against the server it starts (key, JSON)
    assert "Authorization" in serve and "Content-Type" in serve


def test_bench_quality_bad_numbers_are_one_line(capsys):
    for args, want in ((["--threads", "0"], "--threads: must be at least 1, got 0"),
                       (["--max-minutes", "0"], "--max-minutes: must be positive")):
        code, _, err = cli(capsys, "bench", "quality", *args, "--report-only")
        assert code == 2 and want in one_error_line(err)


@pytest.mark.parametrize("case", ["missing-data", "bad-key", "no-target", "out-exists", "bad-yaml-key",
                                  "bad-max-steps", "task-flag-over-yaml", "yaml-section-not-a-mapping",
                                  "yaml-number-not-a-number", "relora-without-lora"])
def test_train_errors_are_one_line(capsys, tmp_path, bert_dir, sentiment_csv, case):
    out = tmp_path / "o"
    args = ["train", bert_dir, sentiment_csv, "--out", out, *FAST]
    expect = {"missing-data": "does not exist", "bad-key": "rnk", "no-target": "matched no module",
              "out-exists": "exists; pass --force", "bad-yaml-key": "did you mean 'adapter'",
              "bad-max-steps": "max_steps: must be a whole number ≥ 1",
              "task-flag-over-yaml": "--task: 'bogus' is not one of",
              "yaml-section-not-a-mapping": "c.yaml: adapter: expected a mapping, got list [1, 2]",
              "yaml-number-not-a-number": "lr: must be a number, got str 'fast'",
              "relora-without-lora": "--strategy relora merges and restarts a LoRA adapter; it needs --method lora"}[case]
    if case == "missing-data":
        args[2] = tmp_path / "nope.csv"
    elif case == "bad-key":
        (tmp_path / "c.yaml").write_text("adapter: {rnk: 4}\n")
        args += ["--config", tmp_path / "c.yaml"]
    elif case == "no-target":
        args += ["--target-modules", "qurey"]
    elif case == "out-exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "bad-yaml-key":
        (tmp_path / "c.yaml").write_text("adaptor: {r: 4}\n")
        args += ["--config", tmp_path / "c.yaml"]
    elif case == "bad-max-steps":
        args += ["--max-steps", "-1"]  # trained nothing and saved an untrained adapter
    elif case == "yaml-section-not-a-mapping":  # a TypeError traceback before
        (tmp_path / "c.yaml").write_text("adapter: [1, 2]\n")
        args += ["--config", tmp_path / "c.yaml"]
    elif case == "yaml-number-not-a-number":
        (tmp_path / "c.yaml").write_text("train: {lr: fast}\n")
        args += ["--config", tmp_path / "c.yaml"]
    elif case == "relora-without-lora":  # refused before the model loads, not inside training
        args += ["--method", "full", "--strategy", "relora"]
    elif case == "task-flag-over-yaml":  # flags override the YAML; the YAML's task won before
        (tmp_path / "c.yaml").write_text("task: classification\n")
        args += ["--config", tmp_path / "c.yaml", "--task", "bogus"]
    code, _, err = cli(capsys, *args)
    assert code != 0
    assert expect in one_error_line(err)
    if case == "out-exists":
        assert (out / "keep.txt").read_text() == "mine"
    if case == "no-target":
        assert "query" in err  # close names are listed
        assert not out.exists()


def test_apply_errors_and_force(capsys, tmp_path, bert_dir):
    model = splice.adapt(AutoModel.from_pretrained(bert_dir), splice.LoraConfig(r=2, target_modules=["query"]))
    splice.save_adapter(model, tmp_path / "ad")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = cli(capsys, "apply", bert_dir, tmp_path / "ad", out)
    assert code != 0 and "exists" in one_error_line(err) and (out / "old.txt").exists()
    code, _, err = cli(capsys, "apply", bert_dir, tmp_path / "ad", out, "--force", "--no-progress")
    assert code == 0 and not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left

    # a truncated base checkpoint: one line naming the file, and the existing output is untouched
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in bert_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    before = (out / "model.safetensors").read_bytes()
    code, _, err = cli(capsys, "apply", broken, tmp_path / "ad", out, "--force", "--no-progress")
    assert code != 0 and "model.safetensors" in one_error_line(err)
    assert (out / "model.safetensors").read_bytes() == before

    # an adapter whose shapes do not fit the base
    torch.manual_seed(1)
    from transformers import BertConfig, BertModel

    other = BertModel(BertConfig(vocab_size=32, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=32))
    splice.save_adapter(splice.adapt(other, splice.LoraConfig(r=2, target_modules=["query"])), tmp_path / "wide")
    code, _, err = cli(capsys, "apply", bert_dir, tmp_path / "wide", tmp_path / "o2", "--no-progress")
    line = one_error_line(err)
    assert code != 0 and "query" in line and "shape" in line and not (tmp_path / "o2").exists()


def weight_methods() -> list[str]:
    """Methods with a weight delta to apply (prompt methods train in tests/cli/test_train_prompts.py)."""
    from splice.adapters.prompts import PromptConfig
    from splice.adapters.registry import get_method

    return [m for m in splice.method_names() if not issubclass(get_method(m).config, PromptConfig)]


@pytest.mark.parametrize("method", weight_methods())
def test_every_method_trains_then_applies(capsys, tmp_path, bert_dir, sentiment_csv, method):
    """`splice train --method NAME` with the method's defaults (sized down) runs a few steps and saves a folder
    that loads back, that `splice inspect` describes and that `splice apply` merges into the same model (or, for a
    method that is not a weight delta, refuses with one line)."""
    out = tmp_path / method
    # Sizes that fit the 16-wide model (SHiRA's default r=32, FourierFT's 1000 coefficients do not).
    fields = splice.adapters.config.field_help(splice.adapters.get_method(method).config)
    # Bottleneck adapters: m = 16 // 4 = 4 (Compacter's default reduction 32 leaves no bottleneck at width 16).
    small = {k: v for k, v in {"r": 2, "n_frequency": 16, "reduction_factor": 4}.items() if k in fields}
    if "oft_block_size" in fields:  # OFT's r is derived from its block size (32 does not divide 16)
        small = {"oft_block_size": 4}
    own = {f.name: f.default for f in dataclasses.fields(splice.adapters.get_method(method).config)}
    if own.get("init_weights") is False:  # FourierFT draws its start from N(0, 1), as PEFT: start it at ΔW = 0
        small["init_weights"] = True
    config = tmp_path / "small.yaml"
    config.write_text(f"adapter: {json.dumps(small)}\n")
    code, stdout, err = cli(capsys, "train", bert_dir, sentiment_csv, "--out", out, "--method", method, "-c", config,
                            "--max-steps", 3, "--batch-size", 8, "--max-length", 8, "--lr", "0.01", "--no-progress")
    assert code == 0, err
    assert f"{method} accuracy:" in stdout
    x = torch.randint(0, 32, (3, 6))
    with torch.no_grad():
        base = AutoModel.from_pretrained(bert_dir).eval()(input_ids=x).last_hidden_state
        adapted = splice.load_adapter(AutoModel.from_pretrained(bert_dir).eval(), out)(input_ids=x).last_hidden_state
    # Every method starts at the identity (checked here on an untrained adapter of the same config), so a trained
    # output that differs from the base's means the three steps moved it (AdaLoRA's λ starts at 0 and its update
    # stays ~1e-5 after three steps at this learning rate, so any threshold would be arbitrary).
    fresh = splice.adapt(AutoModel.from_pretrained(bert_dir).eval(), splice.adapters.registry.make_config(
        method, **small))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).last_hidden_state, base, atol=1e-5, rtol=1e-5)
    assert (adapted - base).abs().max() > 0
    code, stdout, _ = cli(capsys, "inspect", out, "--json")
    info = json.loads(stdout)
    assert code == 0 and info["method"] == method and info["wrapped_modules"] >= 1
    code, _, err = cli(capsys, "apply", bert_dir, out, tmp_path / "merged", "--no-progress")
    if not splice.adapters.get_method(method).config.has_delta:  # bottleneck adapters: one line, nothing written
        assert code != 0 and err.strip().splitlines() == [
            f"error: {out}: {method} adapters are not a weight delta: they cannot be merged or compressed; "
            "serve or train them as they are"]
        assert not (tmp_path / "merged").exists()
        return
    assert code == 0, err
    with torch.no_grad():
        full = AutoModel.from_pretrained(tmp_path / "merged").eval()(input_ids=x).last_hidden_state
    torch.testing.assert_close(full, adapted, atol=1e-5, rtol=1e-5)
