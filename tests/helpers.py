"""Helpers shared by test modules (importable as `helpers`: pytest puts tests/ on sys.path, see pyproject.toml)."""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def word_tokenizer(words: Iterable[str], specials: Iterable[str] = ("[PAD]", "[UNK]", "[EOS]"), *,
                   split_punctuation: bool = True, **tokens: str | None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: `specials` then `words`, one id each in that order, nothing added on its own.

    `tokens` are the special-token arguments of `PreTrainedTokenizerFast` (default: [UNK], [PAD] and [EOS]; None
    leaves one out). `split_punctuation=False` splits on whitespace only, so "role:" stays one word.
    """
    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    named = {"unk_token": "[UNK]", "pad_token": "[PAD]", "eos_token": "[EOS]", **tokens}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in named.items() if v is not None})


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `splice ARGS` in-process: (exit code, stdout, stderr), without what fixtures printed before it."""
    from splice.cli import run

    capsys.readouterr()  # drop what fixtures printed (HF progress bars)
    code = run([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    """The single `error: ...` line a failing command printed, asserting it printed nothing else."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def train_with_hf_trainer(model, output_dir) -> dict[str, tuple]:
    """Two steps of `transformers.Trainer` on random token rows (labels = inputs). Asserts that every trainable
    parameter moved and every frozen one did not; returns {name: shape} of the trained parameters."""
    import torch
    from transformers import Trainer, TrainingArguments

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 100, (4, 6), generator=g)]
    args = TrainingArguments(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, learning_rate=1e-2, save_strategy="no", logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=data).train()
    now = dict(model.named_parameters())
    for n, before in trainable.items():
        assert not torch.equal(now[n], before), f"{n} did not train"
    for n, before in frozen.items():
        assert torch.equal(now[n], before), f"base weight {n} changed"
        assert not now[n].requires_grad
    return {n: tuple(p.shape) for n, p in trainable.items()}


def each_row_alone(fam, model, batch, names) -> list:
    """Each row of `batch` run on its own with its adapter (None: the base alone): what a mixed batch must equal.
    `fam` is a tiny model family from the `tiny` fixture."""
    import splice

    outputs = []
    for i, name in enumerate(names):
        if name is None:
            with splice.disable_adapters(model):
                outputs.append(fam.output(model, fam.row(batch, i)))
        else:
            splice.set_adapter(model, name)
            outputs.append(fam.output(model, fam.row(batch, i)))
    return outputs
