"""Data loading, splits, batching and collators, all on tiny files and a tiny offline tokenizer."""
from __future__ import annotations

import bz2
import csv
import hashlib
import json

import pytest
import torch
from helpers import word_tokenizer
from transformers import PreTrainedTokenizerFast

from splice.errors import SpliceError
from splice.train.data import (
    CausalLMCollator,
    ClassificationCollator,
    TextDataset,
    batches,
    load_classification_file,
    load_lm_file,
    rt_sentiment,
    split_train_eval,
)

WORDS = "the a movie film was is great bad good awful q answer yes no why because".split()


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: one id per word, no special tokens added on its own."""
    return word_tokenizer(WORDS)


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def errors_of(fn, *args, **kwargs) -> str:
    with pytest.raises(SpliceError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------------------- classification files
def test_csv_string_labels(tmp_path):
    f = write_csv(tmp_path / "d.csv", ["text", "label"], [["good film", "pos"], ["bad film", "neg"], ["great", "pos"]])
    ds = load_classification_file(f)
    assert ds.label_names == ["neg", "pos"]
    assert ds.texts == ["good film", "bad film", "great"]
    assert ds.labels == [1, 0, 1]
    assert len(ds) == 3 and ds[1] == ("bad film", 0) and list(ds)[2] == ("great", 1)


def test_csv_custom_fields_and_numeric_labels(tmp_path):
    rows = [["a", "10"], ["b", "2"], ["c", "9"], ["d", "2"]]
    ds = load_classification_file(write_csv(tmp_path / "d.csv", ["review", "stars"], rows), "review", "stars")
    assert ds.label_names == ["2", "9", "10"]  # numeric order, not "10" < "2"
    assert ds.labels == [2, 0, 1, 0]


def test_jsonl_int_labels_and_blank_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "x", "label": 1}\n\n{"text": "y", "label": 0}\n{"text": "z", "label": 1}\n')
    ds = load_classification_file(f)
    assert ds.label_names == ["0", "1"] and ds.labels == [1, 0, 1]


def test_tsv(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("text\tlabel\ngood, really\tpos\nbad\tneg\n")
    assert load_classification_file(f).texts == ["good, really", "bad"]


def test_missing_file(tmp_path):
    msg = errors_of(load_classification_file, tmp_path / "nope.csv")
    assert "nope.csv" in msg and "does not exist" in msg


def test_unsupported_suffix(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("hello\n")
    assert ".txt" in errors_of(load_classification_file, f)


def test_missing_column_lists_columns_and_closest(tmp_path):
    f = write_csv(tmp_path / "d.csv", ["text", "lable"], [["a", "x"], ["b", "y"]])
    msg = errors_of(load_classification_file, f)
    assert "d.csv" in msg and "'label'" in msg and "columns: text, lable" in msg and "did you mean 'lable'" in msg


def test_jsonl_missing_field_names_line(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"txt": "b", "label": 1}])
    msg = errors_of(load_classification_file, f)
    assert "d.jsonl:2" in msg and "'text'" in msg and "did you mean 'txt'" in msg


def test_bad_json_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": \n')
    msg = errors_of(load_classification_file, f)
    assert "d.jsonl:2" in msg and "invalid JSON" in msg


def test_json_line_not_an_object(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('["a", 0]\n')
    assert "d.jsonl:1" in errors_of(load_classification_file, f)


def test_bad_label_type(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0.5}, {"text": "b", "label": 1}])
    msg = errors_of(load_classification_file, f)
    assert "d.jsonl:1" in msg and "'label'" in msg and "float" in msg


def test_empty_cell_names_line(tmp_path):
    f = write_csv(tmp_path / "d.csv", ["text", "label"], [["a", "x"], ["", "y"]])
    msg = errors_of(load_classification_file, f)
    assert "d.csv:3" in msg and "'text'" in msg


@pytest.mark.parametrize("content", ["", "text,label\n", "\n\n"])
def test_empty_file(tmp_path, content):
    f = tmp_path / ("d.jsonl" if content.startswith("\n") else "d.csv")
    f.write_text(content)
    assert "empty" in errors_of(load_classification_file, f)


def test_single_class(tmp_path):
    f = write_csv(tmp_path / "d.csv", ["text", "label"], [["a", "pos"], ["b", "pos"]])
    msg = errors_of(load_classification_file, f)
    assert "d.csv" in msg and "'label'" in msg and "1 class" in msg


# ----------------------------------------------------------------------------------------------- LM files
def test_lm_jsonl_pairs_and_text_rows(tmp_path):
    f = write_jsonl(tmp_path / "lm.jsonl", [{"prompt": "q", "completion": "answer"}, {"text": "the film"},
                                            {"completion": "yes"}])
    assert load_lm_file(f) == [("q", "answer"), ("", "the film"), ("", "yes")]


def test_lm_csv(tmp_path):
    f = write_csv(tmp_path / "lm.csv", ["prompt", "completion", "text"], [["q", "a", ""], ["", "", "only text"]])
    assert load_lm_file(f) == [("q", "a"), ("", "only text")]


def test_lm_errors(tmp_path):
    f = write_csv(tmp_path / "lm.csv", ["prompt", "answer"], [["q", "a"]])
    msg = errors_of(load_lm_file, f)
    assert "lm.csv" in msg and "'completion' or 'text'" in msg and "columns: prompt, answer" in msg
    f = write_jsonl(tmp_path / "lm.jsonl", [{"text": "a"}, {"prompt": "q"}])
    msg = errors_of(load_lm_file, f)
    assert "lm.jsonl:2" in msg and "'completion'" in msg
    f = write_jsonl(tmp_path / "lm2.jsonl", [{"body": "a"}])
    msg = errors_of(load_lm_file, f)
    assert "lm2.jsonl:1" in msg and "'text'" in msg


# ----------------------------------------------------------------------------------------------- splits and batches
def test_split_is_deterministic_and_disjoint():
    ds = TextDataset([f"t{i}" for i in range(50)], [i % 2 for i in range(50)], ["a", "b"])
    train, held = split_train_eval(ds, 0.2, seed=3)
    again = split_train_eval(ds, 0.2, seed=3)
    assert (train, held) == again
    assert len(held) == 10 and len(train) == 40
    assert sorted(train.texts + held.texts) == sorted(ds.texts)
    assert held.label_names == ["a", "b"]
    assert split_train_eval(ds, 0.2, seed=4)[1].texts != held.texts
    plain_train, plain_eval = split_train_eval(list(range(10)), 0.3)
    assert len(plain_eval) == 3 and sorted(plain_train + plain_eval) == list(range(10))


def test_split_errors():
    ds = TextDataset(["a"], [0], ["x", "y"])
    assert "at least 2" in errors_of(split_train_eval, ds)
    assert "eval_fraction" in errors_of(split_train_eval, ds, 1.5)


def test_batches():
    assert list(batches(list(range(5)), 2, shuffle=False)) == [[0, 1], [2, 3], [4]]
    a = list(batches(list(range(20)), 6, shuffle=True, seed=1))
    assert a == list(batches(list(range(20)), 6, shuffle=True, seed=1))
    assert sorted(x for b in a for x in b) == list(range(20)) and a[0] != [0, 1, 2, 3, 4, 5]
    ds = TextDataset(["x", "y", "z"], [0, 1, 0], ["a", "b"])
    assert list(batches(ds, 2)) == [[("x", 0), ("y", 1)], [("z", 0)]]
    assert "batch_size" in errors_of(lambda: list(batches([1], 0)))


# ----------------------------------------------------------------------------------------------- rt_sentiment
def in_test(text: str) -> bool:
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % 5 == 0


def test_rt_sentiment_from_given_file(tmp_path):
    rows = [[f"review number {i} &amp;  fine", "fresh" if i % 3 else "rotten"] for i in range(60)]
    rows += [["both labels", "fresh"], ["both labels", "rotten"], ["a plot summary", "plot"], ["  ", "fresh"],
             ["review number 1 &amp;  fine", "fresh"]]  # duplicate of a kept row
    f = tmp_path / "rt.csv.bz2"
    with bz2.open(f, "wt", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["movie_name", "text", "category"])
        w.writerows([["m", t, c] for t, c in rows])
    train, test = rt_sentiment(max_train=None, max_test=None, path=f)
    texts = train.texts + test.texts
    assert train.label_names == ["rotten", "fresh"]
    assert len(texts) == 60 and len(set(texts)) == 60
    assert "review number 1 & fine" in texts and "both labels" not in texts
    assert all(in_test(t) for t in test.texts) and not any(in_test(t) for t in train.texts)
    label = dict(zip(texts, train.labels + test.labels))
    assert label["review number 0 & fine"] == 0 and label["review number 1 & fine"] == 1
    small, small_test = rt_sentiment(max_train=5, max_test=2, seed=1, path=f)
    assert len(small) == 5 and len(small_test) == 2
    assert (small, small_test) == rt_sentiment(max_train=5, max_test=2, seed=1, path=f)
    assert set(small.texts) <= set(train.texts)


def test_rt_sentiment_errors(tmp_path):
    assert "does not exist" in errors_of(rt_sentiment, path=tmp_path / "none.csv.bz2")
    f = write_csv(tmp_path / "rt.csv", ["text", "label"], [["a", "fresh"]])
    assert "'category'" in errors_of(rt_sentiment, path=f)


# ----------------------------------------------------------------------------------------------- collators
def test_classification_collator_pads_and_truncates(tokenizer):
    collate = ClassificationCollator(tokenizer, max_length=4)
    out = collate([("the movie was great", 1), ("bad", 0), ("the film was awful awful awful", 0)])
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert out["input_ids"].shape == (3, 4)  # longest is cut to max_length
    assert out["labels"].dtype == torch.long and out["labels"].tolist() == [1, 0, 0]
    assert out["attention_mask"][1].tolist() == [1, 0, 0, 0]
    assert out["input_ids"][1, 1:].tolist() == [tokenizer.pad_token_id] * 3
    short = collate([("bad", 0), ("good", 1)])
    assert short["input_ids"].shape == (2, 1)  # padded only to the batch's longest


def test_causal_collator_masks_prompt_and_padding(tokenizer):
    collate = CausalLMCollator(tokenizer, max_length=16)
    ids = tokenizer.convert_tokens_to_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = collate([("q why", "because"), ("", "the film was good")])
    assert out["input_ids"][0].tolist() == [ids("q"), ids("why"), ids("because"), eos, pad]
    assert out["labels"][0].tolist() == [-100, -100, ids("because"), eos, -100]
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 1, 0]
    assert out["labels"][1].tolist() == out["input_ids"][1].tolist()  # no prompt: every token is trained on
    assert out["input_ids"][1, -1].item() == eos


def test_causal_collator_truncation_keeps_completion(tokenizer):
    collate = CausalLMCollator(tokenizer, max_length=6)
    out = collate([("the movie was great the film was bad", "yes")])
    assert out["input_ids"].shape == (1, 6)
    # the prompt loses its beginning, so the completion and eos still fit
    assert out["input_ids"][0, -2:].tolist() == [tokenizer.convert_tokens_to_ids("yes"), tokenizer.eos_token_id]
    long = collate([("q", "the movie was great the film was bad")])
    assert long["input_ids"].shape == (1, 6) and long["labels"][0, 0].item() == -100
    assert (long["labels"][0, 1:] != -100).all()


def test_causal_collator_truncation_keeps_the_bos():
    from tokenizers import processors

    tok = word_tokenizer(WORDS, ("[PAD]", "[UNK]", "[EOS]", "[BOS]"), bos_token="[BOS]")
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", bos)])
    collate = CausalLMCollator(tok, max_length=6)
    ids = collate([("the movie was great the film was bad", "yes")])["input_ids"][0].tolist()
    # the prompt loses its beginning, not the bos a Llama expects first
    assert ids == [bos, *tok.convert_tokens_to_ids(["film", "was", "bad", "yes"]), tok.eos_token_id]


def test_an_eval_file_reads_its_labels_with_the_training_ids(tmp_path):
    train = load_classification_file(write_csv(tmp_path / "t.csv", ["text", "label"],
                                               [["a", "neg"], ["b", "neu"], ["c", "pos"]]))
    evaluation = load_classification_file(write_csv(tmp_path / "e.csv", ["text", "label"], [["x", "pos"], ["y", "pos"]]),
                                          label_names=train.label_names)  # one class is a valid test set
    assert evaluation.labels == [2, 2] and evaluation.label_names == ["neg", "neu", "pos"]
    bad = write_csv(tmp_path / "b.csv", ["text", "label"], [["x", "pos"], ["y", "maybe"]])
    assert "b.csv:3: label 'maybe' is not one of the training labels (neg, neu, pos)" in errors_of(
        load_classification_file, bad, label_names=train.label_names)


def test_has_field_reads_tsv_and_a_byte_order_mark(tmp_path):
    from splice.train.data import has_field

    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tlabel\nthe movie\tpos\n", encoding="utf-8")
    bom = tmp_path / "d.csv"
    bom.write_text("label,text\npos,the movie\n", encoding="utf-8-sig")
    assert has_field(tsv, "label") and has_field(bom, "label") and not has_field(tsv, "completion")
    latin = tmp_path / "l.csv"
    latin.write_bytes("text,label\ncaf\xe9,pos\n".encode("latin-1"))
    assert "l.csv: not UTF-8 text" in errors_of(has_field, latin, "label")


def test_collators_need_pad_and_eos(tokenizer):
    tokenizer.pad_token = None
    assert "pad token" in errors_of(ClassificationCollator, tokenizer, 8)
    tokenizer.pad_token = "[PAD]"
    tokenizer.eos_token = None
    assert "eos token" in errors_of(CausalLMCollator, tokenizer, 8)
