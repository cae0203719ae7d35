"""`splice compress` and `splice extract` end to end on tiny BERT folders: round trips through apply and merge,
PEFT loading of extracted adapters, and one-line errors that leave nothing written."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import cli, one_error_line
from safetensors.torch import load_file, save_file
from transformers import AutoModel

import splice
from splice.compress import compress, open_deltas


def make_adapter(base_dir, out):
    model = AutoModel.from_pretrained(base_dir).eval()
    splice.adapt(model, splice.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in splice.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    splice.save_adapter(model, out)
    return out


def make_finetune(base_dir, out, rank=None, seed=2):
    """base + a change to every float tensor (rank-`rank` for matrices when given), saved as an HF folder."""
    model = AutoModel.from_pretrained(base_dir).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and rank is not None:
                p.add_(torch.randn(p.shape[0], rank, generator=g) @ torch.randn(rank, p.shape[1], generator=g) * 0.01)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(out)
    return out


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def expected_weights(base_dir, deltas):
    state = {k: v.float().clone() for k, v in weights(base_dir).items()}
    deltas.apply_to_state_dict(state)
    return state


@pytest.mark.parametrize("method, flags", [
    ("quantize", ["--bits", "4", "--group-size", "16"]),
    ("dare,quantize", ["--density", "0.5", "--bits", "8"]),
    ("svd", ["--rank", "2"]),
    ("compeft", ["--density", "0.3"]),
])
def test_compress_an_adapter_then_apply_equals_the_in_memory_delta(capsys, tmp_path, bert_dir, method, flags):
    adapter = make_adapter(bert_dir, tmp_path / "adapter")
    code, out, err = cli(capsys, "compress", adapter, tmp_path / "small", "--method", method, *flags,
                         "--no-progress")
    assert code == 0, err
    assert "bytes" in out and "x smaller" in out and "rel. error" in out
    assert "encoder.layer.0.attention.self.query.weight" in out  # one row per tensor
    code, _, err = cli(capsys, "apply", bert_dir, tmp_path / "small", tmp_path / "merged", "--no-progress")
    assert code == 0, err
    # the same chain in memory, applied to the base state dict
    params = {"quantize": dict(bits=4, group_size=16), "dare,quantize": dict(density=0.5, bits=8),
              "svd": dict(rank=2), "compeft": dict(density=0.3)}[method]
    small, _ = compress(open_deltas(adapter), method, **params)
    want = expected_weights(bert_dir, open_deltas(tmp_path / "small", str(bert_dir)))
    got = weights(tmp_path / "merged")
    for name in small:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    # ... and the in-memory result (keyed by the adapter's own module names) is that same delta
    for name, d in small.items():
        torch.testing.assert_close(got[name] - weights(bert_dir)[name], d.materialize(), atol=1e-6, rtol=1e-5)


def test_compress_a_full_finetune_with_base_then_merge_it(capsys, tmp_path, bert_dir):
    ft = make_finetune(bert_dir, tmp_path / "ft")
    code, out, err = cli(capsys, "compress", ft, tmp_path / "small", "--base", bert_dir, "--method",
                         "magnitude,quantize", "--density", "0.2", "--bits", "8", "--no-progress")
    assert code == 0, err
    ratio = float(out.strip().splitlines()[-2].split("bytes (")[1].split("x")[0])
    assert ratio > 10  # 20% kept at 8 bits + positions, of an fp32 delta
    deltas = open_deltas(tmp_path / "small", str(bert_dir))
    cfg = {"merge_method": "task_arithmetic", "base_model": str(bert_dir),
           "models": [{"model": str(tmp_path / "small"), "parameters": {"weight": 1.0}}], "dtype": "float32"}
    (tmp_path / "merge.yaml").write_text(json.dumps(cfg))
    code, _, err = cli(capsys, "merge", tmp_path / "merge.yaml", tmp_path / "merged", "--no-progress")
    assert code == 0, err
    want = expected_weights(bert_dir, deltas)
    got = weights(tmp_path / "merged")
    for name in deltas:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-6)


def test_compress_a_full_model_needs_base(capsys, tmp_path, bert_dir):
    ft = make_finetune(bert_dir, tmp_path / "ft")
    code, _, err = cli(capsys, "compress", ft, tmp_path / "small", "--method", "quantize", "--no-progress")
    assert code != 0 and "--base" in one_error_line(err)
    assert not (tmp_path / "small").exists()


@pytest.mark.parametrize("source", ["finetune", "adapter"])
def test_a_compressed_delta_for_another_base_is_refused(capsys, tmp_path, bert_dir, source):
    if source == "finetune":
        src = make_finetune(bert_dir, tmp_path / "ft")
    else:
        src = make_adapter(bert_dir, tmp_path / "adapter")
        (src / "splice_config.json").unlink()  # a plain PEFT folder: the fingerprints come from --base
    code, _, err = cli(capsys, "compress", src, tmp_path / "small", "--base", bert_dir, "--method", "quantize",
                       "--no-progress")
    assert code == 0, err
    other = make_finetune(bert_dir, tmp_path / "other", seed=9)  # same shapes, other values: another "base"
    with torch.no_grad():
        state = {k: v * 3 for k, v in weights(other).items()}
    save_file(state, str(other / "model.safetensors"))
    code, _, err = cli(capsys, "apply", other, tmp_path / "small", tmp_path / "merged", "--no-progress")
    assert code != 0 and "another base" in one_error_line(err)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("args, match", [
    (["--method", "dara"], "did you mean 'dare'"),
    (["--method", "quantize,dare"], "cannot follow"),
    (["--method", "svd", "--rank", "64"], "rank 64"),
    (["--method", "dare", "--bits", "4"], "'bits' is not used"),
])
def test_compress_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, bert_dir, args, match):
    ft = make_finetune(bert_dir, tmp_path / "ft")
    code, _, err = cli(capsys, "compress", ft, tmp_path / "small", "--base", bert_dir, *args, "--no-progress")
    assert code != 0 and match in one_error_line(err)
    assert not (tmp_path / "small").exists()


def test_compress_a_corrupt_adapter_is_one_line(capsys, tmp_path, bert_dir):
    adapter = make_adapter(bert_dir, tmp_path / "adapter")
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(data[:-100])
    code, _, err = cli(capsys, "compress", adapter, tmp_path / "small", "--method", "quantize", "--no-progress")
    assert code != 0 and "adapter_model.safetensors" in one_error_line(err)
    assert not (tmp_path / "small").exists()


# -- extract ----------------------------------------------------------------------------------------------------
def test_extract_recovers_a_rank_r_finetune_exactly_and_loads_in_peft(capsys, tmp_path, bert_dir):
    import peft  # a test dependency: never skipped
    ft = make_finetune(bert_dir, tmp_path / "ft", rank=3)
    code, out, err = cli(capsys, "extract", bert_dir, ft, tmp_path / "lora", "--rank", "3", "--no-progress")
    assert code == 0, err
    assert "lowrank r3" in out and "rel. error" in out
    errors = [float(line.split()[-1]) for line in out.splitlines() if "lowrank r3" in line]
    assert errors and max(errors) < 1e-4
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3 and "embeddings.LayerNorm" in cfg["modules_to_save"]
    # PEFT applies the extracted adapter to the base and gets the fine-tune's outputs
    x = torch.randint(0, 32, (3, 6))
    model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(bert_dir).eval(), tmp_path / "lora").eval()
    full = AutoModel.from_pretrained(ft).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).last_hidden_state, full(input_ids=x).last_hidden_state,
                                   atol=1e-4, rtol=1e-4)
    # and so does splice apply
    code, _, err = cli(capsys, "apply", bert_dir, tmp_path / "lora", tmp_path / "merged", "--no-progress")
    assert code == 0, err
    got, want = weights(tmp_path / "merged"), weights(ft)
    for name in want:
        if want[name].is_floating_point():
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)


def test_extract_energy_chooses_ranks_per_tensor(capsys, tmp_path, bert_dir):
    ft = make_finetune(bert_dir, tmp_path / "ft")
    code, out, err = cli(capsys, "extract", bert_dir, ft, tmp_path / "lora", "--energy", "0.5", "--no-progress")
    assert code == 0, err
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    ranks = {m: cfg["rank_pattern"].get(m, cfg["r"]) for m in cfg["target_modules"]}
    assert len(set(ranks.values())) > 1
    deltas = open_deltas(tmp_path / "lora", str(bert_dir))
    ftw, basew = weights(ft), weights(bert_dir)
    for name, d in deltas.items():
        if name.endswith(".weight") and d.materialize().dim() == 2 and name.replace(".weight", "") in ranks:
            full = ftw[name] - basew[name]
            kept = 1 - float((full - d.materialize()).norm() ** 2 / full.norm() ** 2)
            assert kept >= 0.5 - 1e-5, name


@pytest.mark.parametrize("args, match", [
    (["--rank", "64"], "larger than any weight allows"),
    ([], "exactly one of --rank or --energy"),
    (["--rank", "2", "--energy", "0.5"], "exactly one"),
    (["--energy", "1.5"], "--energy"),
])
def test_extract_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, bert_dir, args, match):
    ft = make_finetune(bert_dir, tmp_path / "ft")
    code, _, err = cli(capsys, "extract", bert_dir, ft, tmp_path / "lora", *args, "--no-progress")
    assert code != 0 and match in one_error_line(err)
    assert not (tmp_path / "lora").exists()


def test_extract_from_models_that_do_not_match_is_one_line(capsys, tmp_path, bert_dir, gpt2_dir):
    code, _, err = cli(capsys, "extract", bert_dir, gpt2_dir, tmp_path / "lora", "--rank", "2", "--no-progress")
    assert code != 0 and "tensor" in one_error_line(err)
    assert not (tmp_path / "lora").exists()


def test_compress_eval_reports_accuracy_before_and_after(capsys, tmp_path, bert_dir, sentiment_csv):
    adapter = tmp_path / "adapter"
    code, _, err = cli(capsys, "train", bert_dir, sentiment_csv, "--out", adapter, "--r", 4, "--lr", "0.01",
                       "--epochs", "2", "--batch-size", "8", "--max-length", "8", "--no-progress")
    assert code == 0, err
    code, out, err = cli(capsys, "compress", adapter, tmp_path / "small", "--base", bert_dir, "--method",
                         "quantize", "--bits", "8", "--eval", sentiment_csv, "--no-progress")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("accuracy on"))
    before, after = float(line.split(": ")[1].split()[0]), float(line.split(", ")[1].split()[0])
    # before = the adapter as trained (what `splice train` scores), after = 8-bit factors: nearly the same
    from splice.train.data import load_classification_file
    from splice.train.run import evaluate_saved

    assert before == pytest.approx(evaluate_saved(str(bert_dir), adapter, load_classification_file(sentiment_csv),
                                                  progress=False), abs=1e-6)
    assert abs(after - before) <= 0.05
    assert (tmp_path / "small" / "head.safetensors").is_file()  # the head travels with the compressed delta


def test_compress_eval_without_a_head_is_one_line_and_writes_nothing(capsys, tmp_path, bert_dir, sentiment_csv):
    ft = make_finetune(bert_dir, tmp_path / "ft")
    code, _, err = cli(capsys, "compress", ft, tmp_path / "small", "--base", bert_dir, "--method", "quantize",
                       "--eval", sentiment_csv, "--no-progress")
    assert code != 0 and "head" in one_error_line(err)
    assert not (tmp_path / "small").exists()


def tiny_model(family: str):
    from transformers import AlbertConfig, AlbertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if family == "gpt2":  # Conv1D layers: weights stored (in, out)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=16)).eval()
    # a Linear named like an embedding (embedding_hidden_mapping_in), which a name rule took for one
    return AlbertModel(AlbertConfig(vocab_size=64, embedding_size=8, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)).eval()


@pytest.mark.parametrize("family, unchanged", [("gpt2", "transformer.h.0.mlp.c_fc"),
                                               ("albert", "encoder.embedding_hidden_mapping_in")])
def test_extract_writes_what_peft_and_splice_load_on_conv1d_and_misleading_names(tmp_path, family, unchanged):
    """Every 2-D weight changes by rank 2, except `unchanged`, whose bias alone changes: PEFT and splice both
    get the fine-tune back (Conv1D factors the right way round, the lone bias kept, no name taken for a kind)."""
    import peft

    from splice.compress.extract import extract

    tiny_model(family).save_pretrained(tmp_path / "base")
    ft = tiny_model(family)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if name == f"{unchanged}.bias":
                p.add_(0.5)
            elif p.dim() == 2 and not name.startswith(unchanged):
                p.add_(torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g) * 0.05)
    ft.save_pretrained(tmp_path / "ft")
    extract(str(tmp_path / "base"), tmp_path / "ft", tmp_path / "lora", rank=2, progress=False)
    x = torch.randint(0, 64, (2, 7))

    def out(model):  # the last hidden state: GPT-2's head is tied to wte, which PEFT's LoRA on wte leaves alone
        with torch.no_grad():
            return model(input_ids=x, output_hidden_states=True).hidden_states[-1]

    want = out(ft)
    by_peft = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "lora").eval()
    torch.testing.assert_close(out(by_peft), want, atol=1e-4, rtol=1e-4)
    by_splice = splice.load_adapter(tiny_model(family), tmp_path / "lora")
    torch.testing.assert_close(out(by_splice), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lokr", "ia3"])
def test_compressing_a_non_lora_adapter_without_base_is_one_line(capsys, tmp_path, bert_dir, method):
    model = AutoModel.from_pretrained(bert_dir).eval()
    fields = {"lokr": dict(r=2, target_modules=["query", "value"]),
              "ia3": dict(target_modules=["query", "value"], feedforward_modules=[])}[method]
    splice.adapt(model, splice.adapters.make_config(method, **fields))
    splice.save_adapter(model, tmp_path / method)
    code, _, err = cli(capsys, "compress", tmp_path / method, tmp_path / "small", "--method", "quantize",
                       "--no-progress")
    assert code != 0 and f"a {method} adapter's update is computed from the base weights; pass --base" in \
        one_error_line(err)
    assert not (tmp_path / "small").exists()


def test_inspect_reads_a_compressed_delta_folder(capsys, tmp_path, bert_dir):
    adapter = make_adapter(bert_dir, tmp_path / "adapter")
    code, _, err = cli(capsys, "compress", adapter, tmp_path / "small", "--method", "quantize", "--bits", "4",
                       "--no-progress")
    assert code == 0, err
    code, out, err = cli(capsys, "inspect", tmp_path / "small", "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "compressed delta" and info["bits"] == [4] and info["base_fingerprinted"]
    assert info["updated_tensors"] == len(json.loads((tmp_path / "small" / "delta_config.json").read_text())["tensors"])
