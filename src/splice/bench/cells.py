"""One cell of the adapter table: train one arm on one task and measure it; plus the two baselines.

LP-FT: each task's linear head is fitted on the frozen base first (`fit_head`, which is also the probe row) and then
frozen, so every arm of a task starts from the same head and every merged encoder can be scored with every head.
"""
from __future__ import annotations

import collections
import copy
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from splice.bench.arms import FULL, PROBE, Arm, peft_config
from splice.bench.memory import PeakRss
from splice.bench.tasks import Task
from splice.io.checkpoints import atomic_file, atomic_output_dir
from splice.train.data import ClassificationCollator, TextDataset, batches
from splice.train.loop import TrainConfig, train_loop
from splice.train.run import calibration_arguments, method_hooks
from splice.train.tasks import EncoderClassifier, accuracy, embed, fit_probe


def majority(task: Task) -> float:
    """Test accuracy of always answering the most frequent training label."""
    top = collections.Counter(task.train.labels).most_common(1)[0][0]
    return sum(y == top for y in task.test.labels) / len(task.test)


def tfidf(task: Task) -> float:
    """TF-IDF (word 1-2 grams, sublinear tf) + logistic regression, trained on the train split."""
    from splice.bench.sources import require_module

    require_module("sklearn")
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    clf = LogisticRegression(max_iter=2000, C=10).fit(vec.fit_transform(task.train.texts), task.train.labels)
    pred = clf.predict(vec.transform(task.test.texts))
    return float((pred == torch.tensor(task.test.labels).numpy()).mean())


def fit_head(base: nn.Module, tokenizer: Any, task: Task, max_length: int, head_file: Path,
             progress: bool) -> dict[str, Any]:
    """The frozen probe: fit the task's head on frozen base features, save it, score it (the probe row)."""
    model = EncoderClassifier(base, len(task.labels))
    collate = ClassificationCollator(tokenizer, max_length)
    start = time.perf_counter()
    feats, labels = embed(model, task.train, collate, desc=f"{task.name} probe features", progress=progress)
    torch.manual_seed(0)
    model.head.reset_parameters()
    fit_probe(model.head, feats, labels)
    seconds = time.perf_counter() - start
    head_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(head_file) as tmp:  # another shard may be reading the head
        save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()}, str(tmp))
    return {"accuracy": accuracy(model, task.test, collate, progress, desc=f"{task.name} test"),
            "val_accuracy": accuracy(model, task.val, collate, progress, desc=f"{task.name} val"),
            "trainable": sum(p.numel() for p in model.head.parameters()), "train_seconds": seconds,
            "step_seconds": None, "steps": 0, "peak_rss_mib": None}


def classifier(encoder: nn.Module, task: Task, head_file: Path) -> EncoderClassifier:
    """`encoder` with the task's frozen head (fitted by `fit_head`)."""
    model = EncoderClassifier(encoder, len(task.labels))
    model.head.load_state_dict(load_file(str(head_file)))
    model.head.requires_grad_(False)
    return model.eval()


def _prepare(arm: Arm, encoder: nn.Module, config: Any = None, calibration: dict[str, Any] | None = None
             ) -> tuple[nn.Module, list[nn.Parameter]]:
    """Make `arm`'s trainable parameters on `encoder`: returns (the module to run, its parameters).

    Args:
        config: a splice arm's adapter config (default: `arm.adapter_config()`).
        calibration: `adapt`'s calibration arguments, for a config whose start needs data.
    """
    if arm.method == FULL:
        encoder.requires_grad_(True)
        return encoder, list(encoder.parameters())
    if arm.impl == "peft":
        import peft

        wrapped = peft.get_peft_model(encoder, peft_config(arm))
        return wrapped, [p for p in wrapped.parameters() if p.requires_grad]
    from splice.adapters.model import adapt, trainable_parameters

    adapt(encoder, config or arm.adapter_config(), **(calibration or {}))
    return encoder, trainable_parameters(encoder)


def densify(arm: Arm, module: nn.Module) -> nn.Module:
    """The plain encoder with the trained update folded into its weights (for saving a merge input)."""
    if arm.method == FULL:
        return module
    if arm.impl == "peft":
        return module.merge_and_unload()
    from splice.adapters.model import merge_and_unload

    return merge_and_unload(module)


def train_cell(arm: Arm, base: nn.Module, tokenizer: Any, task: Task, head_file: Path, train: TrainConfig,
               progress: bool, save_to: Path | None = None) -> dict[str, Any]:
    """Train `arm` on `task` (head frozen), score it on test and validation, optionally save the densified model."""
    assert arm.method != PROBE
    torch.manual_seed(train.seed)
    encoder = copy.deepcopy(base)
    # The head goes on first: splice adapts the encoder in place, and a data-driven start (LoRA-SB) calibrates
    # through the task's loss. PEFT wraps the encoder instead, so its classifier is rebuilt around the wrapper.
    model = classifier(encoder, task, head_file)
    collate = ClassificationCollator(tokenizer, train.max_length)
    items = list(task.train)

    def classify(b: dict) -> torch.Tensor:
        return F.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"])

    def loss_fn(batch: list) -> torch.Tensor:
        return classify(collate(batch))

    config = arm.adapter_config() if arm.impl == "splice" else None
    module, params = _prepare(arm, encoder, config,
                              calibration_arguments(config, items, collate, train, classify) if config is not None else {})
    if module is not encoder:
        model = classifier(module, task, head_file)
    steps = (len(items) + train.batch_size - 1) // train.batch_size
    trainable = sum(p.numel() for p in params if p.requires_grad)  # before a strategy reshapes anything (ReLoRA)
    # What the method adds to the loop (AdaLoRA's rank allocation, DyLoRA's rank sampling, SORSA's regulariser,
    # ...), as `splice train` runs it.
    hooks = method_hooks(module, config, train, steps) if config is not None else []
    with PeakRss() as rss:
        result = train_loop(params, lambda e: batches(items, train.batch_size, True, train.seed + e), loss_fn, train,
                            steps, modules=[module], hooks=hooks, progress=progress)
    model.eval()
    out = {"accuracy": accuracy(model, task.test, collate, progress, desc=f"{task.name} test"),
           "val_accuracy": accuracy(model, task.val, collate, progress, desc=f"{task.name} val"),
           "trainable": trainable, "train_seconds": result.seconds,
           "step_seconds": result.seconds / max(result.steps, 1), "steps": result.steps,
           "final_loss": result.final_loss, "peak_rss_mib": rss.peak_mib}
    if result.strategy:  # what the strategy did: parameters trained per step, restarts, projected matrices...
        out["strategy"] = result.strategy
    if save_to is not None:
        plain = densify(arm, module)
        save_to.parent.mkdir(parents=True, exist_ok=True)
        save_model(plain, save_to, tokenizer)
        out["weights_sha256"] = file_sha256(save_to / "model.safetensors")  # tells a re-trained input apart
    return out


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: nn.Module, dest: Path, tokenizer: Any = None) -> None:
    """`save_pretrained` into a sibling folder renamed when complete, so a killed run leaves no half model; with the
    tokenizer files, so the folder loads on its own (`splice.io.models.load_model`, `splice apply`, mergekit)."""
    with atomic_output_dir(dest, force=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


@torch.no_grad()
def score(encoder: nn.Module, tokenizer: Any, tasks: list[Task], heads: dict[str, Path], max_length: int,
          split: str, progress: bool) -> dict[str, float]:
    """Accuracy of one encoder on every task (each with its own frozen head) on `split` ("val" or "test")."""
    collate = ClassificationCollator(tokenizer, max_length)
    out = {}
    for task in tasks:
        data: TextDataset = getattr(task, split)
        model = classifier(encoder, task, heads[task.name])
        out[task.name] = accuracy(model, data, collate, progress, desc=f"{task.name} {split}")
    return out
