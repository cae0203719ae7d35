"""The one training loop. Tasks and methods contribute a loss function and the parameters to train; nothing else.

AdamW, linear warm-up then linear decay, gradient clipping, a progress bar with loss and throughput. A
memory-efficient strategy (`TrainConfig.strategy`: galore, lisa, hft, relora; see `splice.train.optim`) changes
what it must through the loop's hooks (the optimizer, which parameters train before each step, what happens after
it, a factor on the schedule), never through a copy of the loop.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
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
    strategy: Any = doc("Memory-efficient training strategy: galore, lisa, hft or relora (`splice strategies`), "
                        "or its config object (GaloreConfig(rank=8)); None trains with plain AdamW.", default=None)
    strategy_options: dict[str, Any] = doc("The strategy's options, e.g. {'rank': 8} for galore.",
                                           default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpliceError(f"{name}: must be a number, got {type(value).__name__} {value!r}")
        for name in ("epochs", "batch_size", "lr"):
            if getattr(self, name) <= 0:
                raise SpliceError(f"{name}: must be positive, got {getattr(self, name)!r}")
        for name in ("batch_size", "max_length"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise SpliceError(f"{name}: must be a whole number, got {getattr(self, name)!r}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise SpliceError(f"max_steps: must be a whole number ≥ 1 (or unset: epochs decide), got "
                              f"{self.max_steps!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise SpliceError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio!r}")
        from splice.train.optim.registry import StrategyConfig

        if isinstance(self.strategy, StrategyConfig):  # a config object: keep its name and fields as plain data
            self.strategy_options = {**self.strategy.to_dict(), **(self.strategy_options or {})}
            self.strategy = self.strategy.name
        if self.strategy is None and self.strategy_options:
            raise SpliceError("strategy_options: given without a strategy; name one (galore, lisa, hft, relora)")
        if self.strategy is not None and not isinstance(self.strategy, str):
            raise SpliceError(f"strategy: expected a strategy name or config, got {type(self.strategy).__name__}")
        if not isinstance(self.strategy_options, dict):
            raise SpliceError(f"strategy_options: expected a mapping, got {self.strategy_options!r}")
        self.strategy_config()  # an unknown strategy or a bad option fails now, not after loading the model

    def strategy_config(self) -> Any:
        """The strategy's validated config object, or None."""
        from splice.train.optim.registry import make_strategy_config

        return make_strategy_config(self.strategy, **self.strategy_options) if self.strategy else None


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    examples_per_second: float
    strategy: dict[str, Any] = field(default_factory=dict)  # what the strategy reports (`TrainStrategy.summary`)


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
            the loss, `after_step(step)`, run after the optimizer step (1-based) while the gradients are there,
            `make_optimizer(params, lr, weight_decay)`, the run's optimizer when no strategy brings one (SpIEL's
            and IncreLoRA's per-element-age AdamW), and `bind_optimizer(optimizer)`, called once with the optimizer
            before the first step.

    `config.strategy` (GaLore, LISA, HFT, ReLoRA) is built here over `params` and `modules` and called at its hooks:
    see `splice.train.optim.registry.TrainStrategy`.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise SpliceError("nothing to train: no parameter requires a gradient")
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup = int(config.warmup_ratio * total)
    strategy = _strategy(config, params, modules, total)
    opt = strategy.optimizer(params, config.lr, config.weight_decay) if strategy else None
    makers = [h.make_optimizer for h in hooks if hasattr(h, "make_optimizer")]
    if opt is None and len(makers) > 1:
        raise SpliceError(f"{len(makers)} training hooks each bring their own optimizer; train one such method at "
                          "a time")
    opt = opt or (makers[0](params, config.lr, config.weight_decay) if makers else None)
    opt = opt or torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    for hook in hooks:  # a method that moves optimizer state (SpIEL's index updates) needs the optimizer
        if hasattr(hook, "bind_optimizer"):
            hook.bind_optimizer(opt)
    factor = strategy.lr_factor if strategy else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: factor(s) * ((s + 1) / (warmup + 1) if s < warmup
                                    else max(0.0, (total - s) / max(1, total - warmup))))
    torch.manual_seed(config.seed)
    for m in modules:
        m.train()
    step, seen, loss_avg, start = 0, 0, float("nan"), time.perf_counter()
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        epoch = 0
        while step < total:
            step_at_epoch_start = step
            for batch in batches(epoch):
                if strategy:
                    strategy.before_step(step, opt)
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
                if strategy:
                    strategy.after_step(step + 1, opt)
                opt.zero_grad(set_to_none=True)
                step += 1
                seen += batch_size_of(batch)
                loss_avg = loss.item() if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss.item()
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{loss_avg:.4f}", ex_s=f"{seen / elapsed:.1f}")
                bar.update()
                if step >= total:
                    break
            if step == step_at_epoch_start:  # an epoch without one batch would loop forever
                raise SpliceError("no training batches: the training set is empty")
            epoch += 1
    finally:
        bar.close()
        if strategy:
            strategy.close()
        for m in modules:
            m.eval()
    elapsed = time.perf_counter() - start
    return TrainResult(step, elapsed, loss_avg, seen / max(elapsed, 1e-9), strategy.summary() if strategy else {})


def _strategy(config: TrainConfig, params: Sequence[nn.Parameter], modules: Sequence[nn.Module], total: int):
    """The run's strategy mechanism (None without one)."""
    if not config.strategy:
        return None
    from splice.train.optim.registry import build_strategy

    return build_strategy(config.strategy_config(), params, modules, total, config.seed)
