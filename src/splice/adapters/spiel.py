"""SpIEL: sparse fine-tuning with a learned index set (Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large
Language Models", https://arxiv.org/abs/2401.16405).

    ΔW = S          S non-zero only on an index set η of exactly k = ⌈density · out · in⌉ entries
    y  = (W₀ + S) x + b          the k values train (they start at 0 → ΔW = 0); η itself changes during training

Every `reselection_steps` steps the index set is updated (`SpielTrainer.after_step`), after accumulating the
gradient of the dense weight over the `selection_accumulation_steps` steps before the update (SpIEL-AG):

    drop:  the n = ⌊p · k⌋ entries of η with the smallest |Δ|; their Δ is reset to 0 (W returns to W₀ there)
    grow:  the n entries outside the kept set with the largest |Σ_t ∂L/∂W_t|; their Δ starts at 0 and their
           optimizer moments at the accumulated statistics (mean gradient, mean squared gradient)
    p = 1 at the first update (the whole initial random set is re-chosen by gradient), then
    p = initial_reselection_rate · (1 − step / total_steps)

An entry both dropped and regrown keeps its slot and value. The trained vector keeps exactly k entries throughout,
so the optimizer's parameter set never changes; the slots that move get fresh optimizer state.

Choices where the paper leaves a detail to its code (https://github.com/AlanAnsell/peft, `SftConfig` defaults):
density 0.01, reselection every 20 steps, 5 accumulation steps, initial reselection rate 0.2, the first update
replacing the whole (random) initial set, growth by |accumulated gradient|. The reference's density is a fraction
of all the model's parameters, spread over the targeted matrices in proportion to their size; here it is a
fraction of each targeted matrix — the same allocation, with the budget counted on the targets (every linear layer
by default). The dense gradient comes for free: the forward builds W₀ + S for one matmul, whose
gradient autograd forms before gathering it at η; a tensor hook adds it into two dense accumulators during the
accumulation window only (the reference keeps a candidate subset instead; this keeps whole matrices for those
steps). The paper's other growth criterion (SM3 momenta) is not implemented.

The trainer brings the run's optimizer (`make_optimizer`): AdamW with an age per SpIEL value
(`splice.train.optim.element_age`), as the reference's `SftAdamW` keeps. A regrown slot's state is the reference's:
the accumulated mean gradient and mean squared gradient as they are, aged by the window's steps, so its next step
is bias-corrected as the window's step count (at the window of 5 steps, 1 / (1 − β₂⁵) ≈ 200 on the second moment:
a regrown slot starts with small steps that grow as it ages). In a loop of one's own, build the optimizer with
`hook.make_optimizer(params, lr, weight_decay)`, or hand yours to `hook.bind_optimizer(optimizer)`: a torch AdamW
gets the same moments under its one step count: about the reference's correction at the first update (the run's
step 6 against the window's 5), and larger steps after the later ones (step t corrects by 1 / (1 − β₂ᵗ), 40 at
t = 25); without either the index set still moves and only the state reset is skipped.

Wraps nn.Linear and HF Conv1D (positions in the weight as stored). Saved as `spiel_values` and `spiel_indices`;
PEFT has no SpIEL (`peft_type: null`, `splice_method: spiel`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.registry import register
from splice.adapters.sparse import (SeedPerModule, SparseEntries, adapters_of, check_fraction, check_int, check_kind,
                                    check_positive_int, count_of, random_flat_positions, seed_of)
from splice.errors import SpliceError
from splice.train.optim.element_age import ElementAgeAdamW


@dataclass
class SpielConfig(SeedPerModule, AdapterConfig):
    """SpIEL hyper-parameters; names follow the reference code's `SftConfig`."""

    target_modules: list[str] | str = doc(
        "Modules to wrap: name suffixes, one regex, or 'all-linear' (every linear layer but the output head).",
        default="all-linear")
    density: float = doc("Fraction of each weight trained: k = ⌈density·out·in⌉ entries per module.", default=0.01)
    reselection_steps: int = doc("Steps between two updates of the index set.", default=20)
    selection_accumulation_steps: int = doc("Steps over which the dense gradient is accumulated before each "
                                            "update.", default=5)
    initial_reselection_rate: float = doc("Fraction of the entries moved at the second update (decaying linearly "
                                          "to 0 over the run; the first update re-chooses all of them).",
                                          default=0.2)
    seed: int = doc("Seed of the initial random index sets (mixed with each module's name).", default=0)

    params_formula: ClassVar[str] = "⌈density·in·out⌉ (a learned set of entries)"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("density", self.density)
        check_positive_int("reselection_steps", self.reselection_steps)
        check_positive_int("selection_accumulation_steps", self.selection_accumulation_steps)
        if self.selection_accumulation_steps > self.reselection_steps:
            raise SpliceError(f"selection_accumulation_steps: {self.selection_accumulation_steps} is more than "
                              f"reselection_steps {self.reselection_steps}")
        check_fraction("initial_reselection_rate", self.initial_reselection_rate)
        check_int("seed", self.seed)

    def training_hook(self, model: nn.Module, adapter_name: str, total_steps: int) -> "SpielTrainer":
        """What the training loop runs for SpIEL: the updates of the index set."""
        return SpielTrainer(model, adapter_name, self, total_steps)


@register("spiel", config=SpielConfig, reference="https://arxiv.org/abs/2401.16405")
class SpielAdapter(SparseEntries):
    """One SpIEL adapter on one module: k trained values on a movable set of entries."""

    values_key: ClassVar[str] = "spiel_values"
    index_key: ClassVar[str] = "spiel_indices"
    peft_keys: ClassVar[tuple[str, ...]] = (values_key, index_key)

    @classmethod
    def entry_count(cls, base: nn.Module, kind: str, config: SpielConfig) -> int:
        return count_of(config.density, base.weight.numel())

    def __init__(self, base: nn.Module, kind: str, config: SpielConfig):
        check_kind("spiel", base, kind)
        numel = base.weight.numel()
        super().__init__(base, kind, random_flat_positions(numel, self.entry_count(base, kind, config),
                                                           seed_of(config)))
        self.numel = numel
        self.grad_sum: Tensor | None = None  # Σ_t ∂L/∂W_t over the window, flat (numel,), fp32
        self.grad_sq: Tensor | None = None  # Σ_t (∂L/∂W_t)²
        self.grad_count = 0

    def accumulate(self, on: bool) -> None:
        """Start (fresh sums) or stop adding the dense weight gradient of every backward into the sums."""
        if on and self.grad_sink is None:
            self.grad_sum = torch.zeros(self.numel, device=self.values.device)
            self.grad_sq = torch.zeros_like(self.grad_sum)
            self.grad_count = 0
            self.grad_sink = self._add_gradient
        elif not on:
            self.grad_sink, self.grad_sum, self.grad_sq, self.grad_count = None, None, None, 0

    @torch.no_grad()
    def _add_gradient(self, grad: Tensor) -> None:
        g = grad.detach().flatten().float()
        self.grad_sum += g
        self.grad_sq.addcmul_(g, g)
        self.grad_count += 1

    @torch.no_grad()
    def move_entries(self, n: int, optimizer: torch.optim.Optimizer | None = None) -> Tensor:
        """Drop the n entries of smallest |Δ| and grow the n best by accumulated gradient; returns the slots whose
        position changed (their value is now 0). A module no backward reached since accumulation started (one the
        loss does not use) keeps its entries."""
        if self.grad_sum is None:
            raise SpliceError("spiel: no gradient is being accumulated to regrow entries from; call "
                              "accumulate(True) and run backward first")
        if not self.grad_count:
            return self.index.new_empty(0)
        values, index = self.values, self.index
        drop = torch.topk(self.current_values().abs(), n, largest=False).indices  # slots
        outgoing = index[drop]
        kept = torch.zeros(self.numel, dtype=torch.bool, device=index.device)
        kept[index] = True
        kept[outgoing] = False
        score = self.grad_sum.abs().masked_fill(kept, float("-inf"))
        grow = torch.topk(score, n).indices  # n positions outside the kept set (there are numel − k + n ≥ n)
        regrown = torch.isin(outgoing, grow)  # dropped and grown again: keeps its slot and value
        slots, new = drop[~regrown], grow[~torch.isin(grow, outgoing)]
        index[slots] = new
        values[slots] = 0.0
        if optimizer is not None:
            mean, mean_sq = self.grad_sum[new] / self.grad_count, self.grad_sq[new] / self.grad_count
            if isinstance(optimizer, ElementAgeAdamW) and optimizer.ages(values):
                # The reference's SftAdamW state: the raw means, aged by the window's steps (its age is the step
                # the next update corrects by; ours counts the step first).
                optimizer.assign(values, slots, self.grad_count - 1, mean, mean_sq)
            else:
                reset_slots(optimizer, values, slots, {"exp_avg": mean, "exp_avg_sq": mean_sq})
        return slots

    def extra_repr(self) -> str:
        return f"k={self.values.numel()}"


def reset_slots(optimizer: torch.optim.Optimizer, param: Tensor, slots: Tensor, init: dict[str, Tensor]) -> None:
    """Give `slots` of `param` fresh optimizer state: `init[name]` for the state tensors named there (AdamW's
    moments), 0 for every other state tensor of the parameter's shape."""
    for name, state in optimizer.state.get(param, {}).items():
        if isinstance(state, Tensor) and state.shape == param.shape:
            state[slots] = init[name].to(state.dtype) if name in init else 0


class SpielTrainer:
    """SpIEL's index-set updates over one adapter of a model, on the schedule of the reference code's
    `SftSelector`: windows of `selection_accumulation_steps` steps starting every `reselection_steps` steps (the
    first at step 1), each followed by an update."""

    def __init__(self, model: nn.Module, adapter_name: str, config: SpielConfig, total_steps: int):
        self.modules = adapters_of(model, adapter_name, SpielAdapter, "SpIEL")
        self.config, self.total = config, total_steps
        self.optimizer: torch.optim.Optimizer | None = None
        self._accumulate(self._in_window(1))

    def make_optimizer(self, params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> ElementAgeAdamW:
        """AdamW over `params` with an age per SpIEL value, as the reference's `SftAdamW` (the training loop calls
        this)."""
        return ElementAgeAdamW.aging(params, [adapter.values for _, adapter in self.modules], lr, weight_decay)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer that steps the adapter's values (the training loop calls this once it has built it)."""
        self.optimizer = optimizer

    def _in_window(self, step: int) -> bool:
        c = self.config
        return step <= self.total and (step - 1) % c.reselection_steps < c.selection_accumulation_steps

    def _accumulate(self, on: bool) -> None:
        for _, adapter in self.modules:
            adapter.accumulate(on)

    def drop_fraction(self, step: int) -> float:
        if step == self.config.selection_accumulation_steps:  # the first update re-chooses the whole set
            return 1.0
        return self.config.initial_reselection_rate * (1 - step / self.total)

    def after_step(self, step: int) -> None:
        """Run after the optimizer step: update the index sets when an accumulation window ends."""
        c = self.config
        if self._in_window(step) and (step - 1) % c.reselection_steps == c.selection_accumulation_steps - 1:
            self.update(step)
            self._accumulate(False)  # the next window starts with fresh sums
        self._accumulate(self._in_window(step + 1))

    @torch.no_grad()
    def update(self, step: int) -> int:
        """Move ⌊p · k⌋ entries of every module; returns how many slots moved in all."""
        p, moved = self.drop_fraction(step), 0
        for _, adapter in self.modules:
            n = int(adapter.values.numel() * p)
            if n:
                moved += adapter.move_entries(n, self.optimizer).numel()
        return moved
