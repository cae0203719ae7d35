"""Train an adapter end to end for one task: what `splice train` and `splice quickstart` run."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from splice.adapters.config import AdapterConfig
from splice.adapters.inject import find_targets
from splice.adapters.model import adapt, trainable_parameters
from splice.adapters.persist import load_adapter, save_adapter
from splice.adapters.prompts.model import is_prompt_config
from splice.io.models import load_model
from splice.train.data import CausalLMCollator, ClassificationCollator, TextDataset, batches
from splice.train.loop import TrainConfig, TrainResult, train_loop
from splice.train.tasks import EncoderClassifier, accuracy, embed, fit_probe, load_head, lm_loss, perplexity, save_head


@dataclass
class RunReport:
    """What a training run measured."""

    metrics: dict[str, float] = field(default_factory=dict)
    train: TrainResult | None = None
    trainable_params: int = 0
    out: Path | None = None


CALIBRATION_BATCHES = 4  # training batches a data-driven init (eva, lora_ga, corda, LoRA-SB) is computed from


def _calibration(adapter: AdapterConfig, items: list, collate: Callable, config: TrainConfig,
                 loss: Callable | None = None) -> dict[str, Any]:
    """adapt()'s calibration arguments: the first few (shuffled) training batches, when the init needs data."""
    if not getattr(adapter, "needs_calibration", False):  # prompt configs have no such property
        return {}
    order = batches(items, config.batch_size, True, config.seed)
    first = [collate(b) for _, b in zip(range(CALIBRATION_BATCHES), order)]
    return {"calibration": first, "calibration_loss": loss}


def _say(log: Callable[[str], None] | None, text: str) -> None:
    if log is not None:
        log(text)


def train_classifier(model_name: str, train: TextDataset, evaluation: TextDataset, adapter: AdapterConfig,
                     config: TrainConfig, out: str | Path, *, force: bool = False, progress: bool = True,
                     log: Callable[[str], None] | None = print) -> RunReport:
    """Frozen probe, then adapter training with the probe's head frozen; saves adapter + head to `out`."""
    torch.manual_seed(config.seed)
    encoder, tokenizer = load_model(model_name, "encoder")
    if not is_prompt_config(adapter):  # prompt methods target no module
        find_targets(encoder, adapter)  # a bad target_modules fails now, not after the probe
    model = EncoderClassifier(encoder, len(train.label_names))
    collate = ClassificationCollator(tokenizer, config.max_length)
    report = RunReport()
    feats, labels = embed(model, train, collate, desc="probe features", progress=progress)
    fit_probe(model.head, feats, labels)
    model.head.requires_grad_(False)
    report.metrics["probe_accuracy"] = accuracy(model, evaluation, collate, progress)
    _say(log, f"frozen probe accuracy: {report.metrics['probe_accuracy']:.4f}  ({len(evaluation)} eval examples)")

    def classify_loss(b: dict) -> torch.Tensor:
        return F.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"])

    adapt(encoder, adapter, **_calibration(adapter, list(train), collate, config, classify_loss))
    params = trainable_parameters(encoder)
    report.trainable_params = sum(p.numel() for p in params)
    _say(log, f"training {adapter.method} ({report.trainable_params:,} parameters) on {len(train)} examples")
    items = list(train)

    def loss_fn(batch: list) -> torch.Tensor:
        b = collate(batch)
        return F.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"])

    steps = (len(items) + config.batch_size - 1) // config.batch_size
    report.train = train_loop(params, lambda e: batches(items, config.batch_size, True, config.seed + e), loss_fn,
                              config, steps, modules=[encoder], hooks=_hooks(encoder, adapter, config, steps),
                              progress=progress)
    report.metrics["accuracy"] = accuracy(model, evaluation, collate, progress)
    _say(log, f"{adapter.method} accuracy: {report.metrics['accuracy']:.4f}  "
              f"({report.train.steps} steps, {report.train.seconds:.0f} s)")
    report.out = save_adapter(encoder, out, force=force)
    save_head(model, report.out, train.label_names, config.max_length)
    _say(log, f"saved adapter to {report.out}")
    return report


def _hooks(model: torch.nn.Module, adapter: AdapterConfig, config: TrainConfig, steps_per_epoch: int) -> list:
    """What the adapter's method adds to the loop (AdaLoRA's rank allocation), for a run of the loop's length."""
    make = getattr(adapter, "training_hook", None)
    if make is None:
        return []
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    return [make(model, "default", total)]


def load_classifier(model_name: str, adapter_dir: str | Path) -> tuple[EncoderClassifier, Any, dict[str, Any]]:
    """Base encoder + a saved adapter + its head, ready to score (eval mode)."""
    encoder, tokenizer = load_model(model_name, "encoder")
    from splice.io.checkpoints import read_json

    task = read_json(Path(adapter_dir) / "task.json")
    model = EncoderClassifier(encoder, len(task["labels"]))
    load_adapter(encoder, adapter_dir)
    load_head(model, Path(adapter_dir))
    return model.eval(), tokenizer, task


def evaluate_saved(model_name: str, adapter_dir: str | Path, data: TextDataset, progress: bool = True) -> float:
    model, tokenizer, task = load_classifier(model_name, adapter_dir)
    return accuracy(model, data, ClassificationCollator(tokenizer, task["max_length"]), progress)


def train_causal_lm(model_name: str, train: list, evaluation: list, adapter: AdapterConfig, config: TrainConfig,
                    out: str | Path, *, force: bool = False, progress: bool = True,
                    log: Callable[[str], None] | None = print) -> RunReport:
    """Adapter training on (prompt, completion) pairs with the loss on completions; saves the adapter."""
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(model_name, "causal-lm")
    if not is_prompt_config(adapter):
        find_targets(model, adapter)
    collate = CausalLMCollator(tokenizer, config.max_length)
    report = RunReport()
    report.metrics["base_perplexity"] = perplexity(model, evaluation, collate, progress=progress)
    _say(log, f"base perplexity: {report.metrics['base_perplexity']:.3f}")
    adapt(model, adapter, **_calibration(adapter, train, collate, config))
    params = trainable_parameters(model)
    report.trainable_params = sum(p.numel() for p in params)
    steps = (len(train) + config.batch_size - 1) // config.batch_size
    report.train = train_loop(params, lambda e: batches(train, config.batch_size, True, config.seed + e),
                              lambda b: lm_loss(model, collate(b)), config, steps, modules=[model],
                              hooks=_hooks(model, adapter, config, steps), progress=progress)
    report.metrics["perplexity"] = perplexity(model, evaluation, collate, progress=progress)
    _say(log, f"{adapter.method} perplexity: {report.metrics['perplexity']:.3f}")
    report.out = save_adapter(model, out, force=force)
    _say(log, f"saved adapter to {report.out}")
    return report
