"""Running calibration batches through the base model for the data-driven LoRA initialisations.

Calibration batches are whatever the model (or `forward`) takes: by default a dict of keyword arguments
(`input_ids`, `attention_mask`, `labels`, ...) passed as `model(**batch)`. The layer inputs of the target modules
are seen through forward hooks, removed again however the run ends; padding (attention_mask 0) and, when asked,
positions whose label is -100 are left out, so that only real tokens shape the statistics.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from splice.errors import SpliceError

IGNORE_INDEX = -100


def default_forward(model: nn.Module) -> Callable[[Any], Any]:
    def forward(batch: Any) -> Any:
        if not isinstance(batch, dict):
            raise SpliceError(f"calibration batches must be dicts of model inputs (input_ids=...), got "
                              f"{type(batch).__name__}; or pass calibration_loss to run them yourself")
        return model(**batch)

    return forward


def token_mask(batch: Any, use_labels: bool) -> Tensor | None:
    """(B, T) bool: the positions whose layer inputs count, or None when the batch says nothing about them."""
    if not isinstance(batch, dict):
        return None
    mask = batch.get("attention_mask")
    mask = mask.bool() if mask is not None else None
    labels = batch.get("labels")
    # Labels mark the positions of the same sequence only in a decoder-only batch: a seq2seq batch's labels are the
    # decoder's (another length), which says nothing about the encoder inputs the mask covers.
    if use_labels and labels is not None and labels.dim() == 2 and (mask is None or labels.shape == mask.shape):
        keep = labels != IGNORE_INDEX
        mask = keep if mask is None else mask & keep
    return mask


def rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """The layer input as (tokens, features), keeping only the masked-in positions of a (B, T, d) input."""
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        return x[mask]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def collect(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable[Any],
            observe: Callable[[str, Tensor, Any], None], forward: Callable[[Any], Any]) -> int:
    """Run every batch through `forward` (in eval mode) and call `observe(name, layer_input, batch)` for each target
    module on each batch. Returns the number of batches."""
    current: dict[str, Any] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            observe(name, x.detach(), current["batch"])
        return fn

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            current["batch"] = batch
            forward(batch)
            count += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not count:
        raise SpliceError("calibration: no batches (the data-driven init needs a few batches of real inputs)")
    return count
