"""The one training loop. Tasks and methods contribute a loss function and the parameters to train; nothing else.

AdamW, linear warm-up then linear decay, gradient clipping, a progress bar with loss and throughput.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from splice.adapters.config import doc
from splice.errors import SpliceError


@dataclass
class TrainConfig:
    """Optimisation settings shared by every task and method."""

    epochs: float = doc("Passes over the training set.", default=3.0)
    batch_size: int = doc("Examples per step.", default=32)
    lr: float = doc("Peak learning rate of AdamW.", default=1e-3)
    weight_decay: float = doc("AdamW weight decay.", default=0.0)
    warmup_ratio: float = doc("Fraction of steps spent warming the learning rate up from 0.", default=0.06)
    max_grad_norm: float = doc("Gradient clipping norm (0 disables).", default=1.0)
    max_length: int = doc("Tokens per example (longer inputs are truncated).", default=64)
    max_steps: int | None = doc("Stop after this many steps (overrides epochs).", default=None)
    seed: int = doc("Seed for shuffling, dropout and initialisation.", default=0)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lr"):
            if getattr(self, name) <= 0:
                raise SpliceError(f"{name}: must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise SpliceError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio!r}")


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    examples_per_second: float


def train_loop(
    params: Sequence[nn.Parameter],
    batches: Callable[[int], Iterable[Any]],
    loss_fn: Callable[[Any], Tensor],
    config: TrainConfig,
    steps_per_epoch: int,
    *,
    modules: Sequence[nn.Module] = (),
    hooks: Sequence[Any] = (),
    progress: bool = True,
    batch_size_of: Callable[[Any], int] = lambda b: len(b),
) -> TrainResult:
    """Train `params` to minimise `loss_fn` over `batches(epoch)`.

    Args:
        params: the parameters to optimise (everything else stays as it is).
        batches: epoch index → an iterable of batches (so each epoch can reshuffle).
        loss_fn: batch → scalar loss.
        config: optimisation settings.
        steps_per_epoch: batches per epoch, for the schedule and the progress bar.
        modules: modules put in train mode during the loop and back in eval mode after it.
        hooks: what a method adds to training (AdaLoRA's rank allocator): each may have `loss()`, a term added to
            the loss, and `after_step(step)`, run after the optimizer step (1-based) while the gradients are there.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise SpliceError("nothing to train: no parameter requires a gradient")
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup = int(config.warmup_ratio * total)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    torch.manual_seed(config.seed)
    for m in modules:
        m.train()
    step, seen, loss_avg, start = 0, 0, float("nan"), time.perf_counter()
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        epoch = 0
        while step < total:
            for batch in batches(epoch):
                loss = loss_fn(batch)
                for hook in hooks:
                    if hasattr(hook, "loss"):
                        loss = loss + hook.loss()
                if not torch.isfinite(loss):
                    raise SpliceError(f"training diverged at step {step}: loss is {loss.item()}; lower --lr")
                loss.backward()
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                opt.step()
                sched.step()
                for hook in hooks:
                    if hasattr(hook, "after_step"):
                        hook.after_step(step + 1)
                opt.zero_grad(set_to_none=True)
                step += 1
                seen += batch_size_of(batch)
                loss_avg = loss.item() if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss.item()
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{loss_avg:.4f}", ex_s=f"{seen / elapsed:.1f}")
                bar.update()
                if step >= total:
                    break
            epoch += 1
    finally:
        bar.close()
        for m in modules:
            m.eval()
    elapsed = time.perf_counter() - start
    return TrainResult(step, elapsed, loss_avg, seen / max(elapsed, 1e-9))
