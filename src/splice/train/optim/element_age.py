"""AdamW whose bias correction counts steps per element.

torch.optim.AdamW corrects a parameter's moments by one step count, so an entry whose optimizer state restarts
mid-run (an IncreLoRA component that starts training when its module grows, a regrown SpIEL entry) is corrected as
if it had been there from the first step. Here a parameter group with ``element_age=True`` keeps an ``age`` per
element (the reference SpIEL code's `SftAdamW` does the same); other groups keep one age per tensor. While no state
is restarted, every age equals the step count and the update is torch.optim.AdamW's.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class ElementAgeAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch's update order) with per-element bias correction in the groups marked
    ``element_age=True``; state ``age``, ``exp_avg``, ``exp_avg_sq``.

    To restart entries, write their ``age`` (the steps the new moments stand for) and the moments as an EMA from
    zero would hold them after that many steps (``restart`` does both).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, element_age: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"ElementAgeAdamW: invalid lr={lr}, betas={betas}, eps={eps} or "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "element_age": element_age})

    @classmethod
    def aging(cls, params: Sequence[nn.Parameter], aged: Iterable[Tensor], lr: float,
              weight_decay: float) -> "ElementAgeAdamW":
        """An optimizer over `params` whose members in `aged` keep an age per element, the rest one per tensor."""
        ids = {id(p) for p in aged}
        groups = [{"params": [p for p in params if id(p) in ids], "element_age": True},
                  {"params": [p for p in params if id(p) not in ids]}]
        return cls([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p, group["element_age"])
                age, exp_avg, exp_avg_sq = state["age"], state["exp_avg"], state["exp_avg_sq"]
                age += 1
                p.mul_(1 - lr * group["weight_decay"])
                exp_avg.lerp_(p.grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                age64 = age.double()  # torch's AdamW corrects in double precision too
                correction1 = (1 - beta1 ** age64).to(p.dtype)
                correction2_sqrt = (1 - beta2 ** age64).sqrt().to(p.dtype)
                denom = (exp_avg_sq.sqrt() / correction2_sqrt).add_(eps)
                p.addcdiv_(exp_avg / correction1, denom, value=-lr)
        return loss

    def ages(self, param: Tensor) -> bool:
        """Whether `param` keeps an age per element here (so its entries can be `restart`-ed or `assign`-ed)."""
        group = self._group(param)
        return group is not None and group["element_age"]

    def _group(self, param: Tensor) -> dict[str, Any] | None:
        return next((g for g in self.param_groups if any(p is param for p in g["params"])), None)

    def _aging_group(self, param: Tensor) -> dict[str, Any]:
        """`param`'s group, which must keep ages per element."""
        group = self._group(param)
        if group is None or not group["element_age"]:
            raise ValueError("ElementAgeAdamW: the parameter is not in a group with element_age=True")
        return group

    def _state(self, p: Tensor, element_age: bool) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state["age"] = torch.zeros(p.shape if element_age else (), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def restart(self, param: Tensor, entries: Any, steps: int, mean: Tensor | float = 0.0,
                mean_sq: Tensor | float = 0.0) -> None:
        """Give `entries` of `param` (any index: slots, rows, ``(slice(None), columns)``) moments standing for
        `steps` steps of gradients with mean `mean` and mean square `mean_sq`: their bias-corrected moments are
        then exactly those statistics. ``steps=0`` is a fresh start, as a parameter added to the optimizer now.

        Raises:
            ValueError: `param` is not in a group with ``element_age=True``, or `steps` < 0.
        """
        beta1, beta2 = self._aging_group(param)["betas"]
        self.assign(param, entries, steps, mean * (1 - beta1 ** steps), mean_sq * (1 - beta2 ** steps))

    @torch.no_grad()
    def assign(self, param: Tensor, entries: Any, age: int, exp_avg: Tensor | float,
               exp_avg_sq: Tensor | float) -> None:
        """Write `entries` of `param`'s state as given: the raw moments, and `age`, the steps they count (the next
        step corrects them as step ``age + 1``). `restart` writes the moments of given statistics through this.

        Raises:
            ValueError: `param` is not in a group with ``element_age=True``, or `age` < 0.
        """
        self._aging_group(param)
        if age < 0:
            raise ValueError(f"ElementAgeAdamW: an age must be at least 0, got {age}")
        state = self._state(param, True)
        state["age"][entries] = float(age)
        for name, value in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            state[name][entries] = torch.as_tensor(value).to(state[name].dtype)
