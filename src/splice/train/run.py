"""Train an adapter end to end for one task: what `splice train` and `splice quickstart` run.

`adapter=None` is full fine-tuning instead (`splice train --method full`): every weight of the base trains and the
output is a complete model folder (config, safetensors, tokenizer) rather than an adapter; that is what the
memory-efficient strategies GaLore, LISA and HFT are for (`TrainConfig.strategy`).
"""
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


def calibration_arguments(adapter: AdapterConfig, items: list, collate: Callable, config: TrainConfig,
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


FULL = "full"  # `splice train --method full`: the name of full fine-tuning in logs and on the command line


def _prepare(model: torch.nn.Module, adapter: AdapterConfig | None, calibration: dict[str, Any]) -> list:
    """Make what trains: the adapter's parameters, or (full fine-tuning, `adapter` None) every weight."""
    if adapter is None:
        model.requires_grad_(True)
        return list(model.parameters())
    adapt(model, adapter, **calibration)
    return trainable_parameters(model)


def _save(model: torch.nn.Module, tokenizer: Any, adapter: AdapterConfig | None, out: str | Path,
          force: bool, extra: Callable[[Path], None] | None = None) -> Path:
    """The adapter folder, or (full fine-tuning) a complete model folder with its tokenizer, written atomically
    (with `extra`'s files, such as a classifier head, inside before the rename)."""
    if adapter is not None:
        return save_adapter(model, out, force=force, extra=extra)
    from splice.io.checkpoints import atomic_output_dir

    with atomic_output_dir(out, force=force) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if extra is not None:
            extra(tmp)
    return Path(out)


def train_classifier(model_name: str, train: TextDataset, evaluation: TextDataset, adapter: AdapterConfig | None,
                     config: TrainConfig, out: str | Path, *, force: bool = False, progress: bool = True,
                     log: Callable[[str], None] | None = print) -> RunReport:
    """Frozen probe, then adapter training with the probe's head frozen; saves adapter + head to `out`.

    `adapter` None fine-tunes every weight of the encoder and saves the whole model (+ head) to `out`.
    """
    torch.manual_seed(config.seed)
    encoder, tokenizer = load_model(model_name, "encoder")
    if adapter is not None and not is_prompt_config(adapter):  # prompt methods target no module
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

    calibration = calibration_arguments(adapter, list(train), collate, config, classify_loss) if adapter else {}
    params = _prepare(encoder, adapter, calibration)
    report.trainable_params = sum(p.numel() for p in params)
    name = _name(adapter, config)
    _say(log, f"training {name} ({report.trainable_params:,} parameters) on {len(train)} examples")
    items = list(train)

    def loss_fn(batch: list) -> torch.Tensor:
        b = collate(batch)
        return F.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"])

    steps = (len(items) + config.batch_size - 1) // config.batch_size
    report.train = train_loop(params, lambda e: batches(items, config.batch_size, True, config.seed + e), loss_fn,
                              config, steps, modules=[encoder], hooks=method_hooks(encoder, adapter, config, steps),
                              progress=progress)
    report.metrics["accuracy"] = accuracy(model, evaluation, collate, progress)
    _say(log, f"{name} accuracy: {report.metrics['accuracy']:.4f}  "
              f"({report.train.steps} steps, {report.train.seconds:.0f} s)")
    report.out = _save(encoder, tokenizer, adapter, out, force,
                       extra=lambda folder: save_head(model, folder, train.label_names, config.max_length))
    _say(log, f"saved {'adapter' if adapter else 'model'} to {report.out}")
    return report


def _name(adapter: AdapterConfig | None, config: TrainConfig) -> str:
    """How logs name the run: the method (or full fine-tuning), with its strategy."""
    return (adapter.method if adapter is not None else FULL) + (f" + {config.strategy}" if config.strategy else "")


def method_hooks(model: torch.nn.Module, adapter: AdapterConfig | None, config: TrainConfig,
                 steps_per_epoch: int) -> list:
    """What the adapter's method adds to the loop (AdaLoRA's rank allocation), for a run of the loop's length."""
    make = getattr(adapter, "training_hook", None)
    if make is None:
        return []
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    return [make(model, "default", total)]


def load_classifier(model_name: str, adapter_dir: str | Path) -> tuple[EncoderClassifier, Any, dict[str, Any]]:
    """Base encoder + a saved adapter + its head, ready to score (eval mode); a folder written by full
    fine-tuning (a model folder with its head) is loaded as the encoder itself."""
    from splice.io.checkpoints import read_json

    full = (Path(adapter_dir) / "config.json").is_file() and not (Path(adapter_dir) / "adapter_config.json").is_file()
    encoder, tokenizer = load_model(str(adapter_dir) if full else model_name, "encoder")
    task = read_json(Path(adapter_dir) / "task.json")
    model = EncoderClassifier(encoder, len(task["labels"]))
    if not full:
        load_adapter(encoder, adapter_dir)
    load_head(model, Path(adapter_dir))
    return model.eval(), tokenizer, task


def evaluate_saved(model_name: str, adapter_dir: str | Path, data: TextDataset, progress: bool = True) -> float:
    model, tokenizer, task = load_classifier(model_name, adapter_dir)
    return accuracy(model, data, ClassificationCollator(tokenizer, task["max_length"]), progress)


def train_causal_lm(model_name: str, train: list, evaluation: list, adapter: AdapterConfig | None,
                    config: TrainConfig, out: str | Path, *, force: bool = False, progress: bool = True,
                    log: Callable[[str], None] | None = print) -> RunReport:
    """Adapter training on (prompt, completion) pairs with the loss on completions; saves the adapter (`adapter`
    None: fine-tunes every weight and saves the model)."""
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(model_name, "causal-lm")
    if adapter is not None and not is_prompt_config(adapter):
        find_targets(model, adapter)
    collate = CausalLMCollator(tokenizer, config.max_length)
    report = RunReport()
    report.metrics["base_perplexity"] = perplexity(model, evaluation, collate, progress=progress)
    _say(log, f"base perplexity: {report.metrics['base_perplexity']:.3f}")
    params = _prepare(model, adapter, calibration_arguments(adapter, train, collate, config) if adapter else {})
    report.trainable_params = sum(p.numel() for p in params)
    name = _name(adapter, config)
    steps = (len(train) + config.batch_size - 1) // config.batch_size
    report.train = train_loop(params, lambda e: batches(train, config.batch_size, True, config.seed + e),
                              lambda b: lm_loss(model, collate(b)), config, steps, modules=[model],
                              hooks=method_hooks(model, adapter, config, steps), progress=progress)
    report.metrics["perplexity"] = perplexity(model, evaluation, collate, progress=progress)
    _say(log, f"{name} perplexity: {report.metrics['perplexity']:.3f}")
    report.out = _save(model, tokenizer, adapter, out, force)
    _say(log, f"saved {'adapter' if adapter else 'model'} to {report.out}")
    return report
