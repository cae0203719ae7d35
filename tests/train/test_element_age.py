"""ElementAgeAdamW: torch's AdamW while no entry restarts; a restarted entry is corrected by its own age."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.errors import SpliceError
from splice.train.loop import TrainConfig, train_loop
from splice.train.optim import ElementAgeAdamW


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(seed: int) -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(5, 3, generator=g(seed))), nn.Parameter(torch.randn(7, generator=g(seed + 1)))]


@pytest.mark.parametrize("element_age", [True, False])
def test_without_restarts_it_is_torch_adamw(element_age):
    ours, theirs = _params(0), _params(0)
    opt = ElementAgeAdamW([{"params": ours[:1], "element_age": element_age}, {"params": ours[1:]}], lr=0.05,
                          weight_decay=0.1)
    ref = torch.optim.AdamW([{"params": theirs[:1]}, {"params": theirs[1:]}], lr=0.05, weight_decay=0.1)
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (s + 1)) for o in (opt, ref)]
    for step in range(12):
        for params in (ours, theirs):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=g(100 * step + i)) * (i + 1)
        opt.step()
        ref.step()
        for s in sched:
            s.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)  # float32 tolerances: the same math, rounded in another order
    assert opt.state[ours[0]]["age"].shape == (ours[0].shape if element_age else ())


def test_a_restarted_entry_steps_as_one_that_saw_those_gradients_from_the_start():
    """Entry 0 sees a constant gradient c for 4 steps from the start; entry 1 of another parameter is restarted
    after 9 steps with (mean c, mean square c², 4 steps). From then on both get the same gradients and must take
    the same steps, although the run's step count differs by 5."""
    lr = 0.01
    early = nn.Parameter(torch.zeros(2))
    late = nn.Parameter(torch.zeros(2))
    first = ElementAgeAdamW([{"params": [early], "element_age": True}], lr=lr, weight_decay=0.0)
    second = ElementAgeAdamW([{"params": [late], "element_age": True}], lr=lr, weight_decay=0.0)
    c = torch.tensor([0.3, -2.0])
    for _ in range(4):
        early.grad = c.clone()
        first.step()
    for _ in range(9):
        late.grad = torch.randn(2, generator=g(5))
        second.step()
    with torch.no_grad():
        late.copy_(early)
    second.restart(late, torch.tensor([0, 1]), 4, c, c * c)
    torch.testing.assert_close(second.state[late]["age"], torch.full((2,), 4.0))
    torch.testing.assert_close(second.state[late]["exp_avg"], first.state[early]["exp_avg"])
    torch.testing.assert_close(second.state[late]["exp_avg_sq"], first.state[early]["exp_avg_sq"])
    for step in range(6):
        grad = torch.randn(2, generator=g(40 + step))
        early.grad, late.grad = grad.clone(), grad.clone()
        first.step()
        second.step()
        torch.testing.assert_close(late, early)


def test_restart_is_refused_outside_an_element_age_group():
    p = nn.Parameter(torch.zeros(3))
    opt = ElementAgeAdamW([p], lr=0.1)
    with pytest.raises(ValueError, match="element_age=True"):
        opt.restart(p, torch.tensor([0]), 2)
    opt = ElementAgeAdamW([p], lr=0.1, element_age=True)
    with pytest.raises(ValueError, match="at least 0"):
        opt.restart(p, torch.tensor([0]), -1)


def test_the_loop_refuses_two_hooks_that_each_bring_an_optimizer():
    p = nn.Parameter(torch.zeros(2))

    class Maker:
        def make_optimizer(self, params, lr, weight_decay):
            return ElementAgeAdamW(params, lr=lr)

    with pytest.raises(SpliceError, match="2 training hooks each bring their own optimizer"):
        train_loop([p], lambda e: [None], lambda b: p.sum(), TrainConfig(max_steps=1), 1, hooks=[Maker(), Maker()],
                   progress=False)


def test_a_fresh_restart_steps_as_a_parameter_added_to_the_optimizer_now():
    """steps=0: columns 1–2 of a trained matrix restart as the authors' IncreLoRA adds a new tensor to the
    optimizer, so from then on they move exactly as a new parameter with the same values and gradients does."""
    old = nn.Parameter(torch.randn(3, 4, generator=g(1)))
    opt = ElementAgeAdamW([{"params": [old], "element_age": True}], lr=0.1, weight_decay=0.0)
    for step in range(7):
        old.grad = torch.randn(3, 4, generator=g(10 + step))
        opt.step()
    cols = (slice(None), slice(1, 3))
    opt.restart(old, cols, 0)
    new = nn.Parameter(old.detach()[cols].clone())
    fresh = ElementAgeAdamW([new], lr=0.1, weight_decay=0.0)
    for step in range(4):
        grad = torch.randn(3, 4, generator=g(30 + step))
        old.grad, new.grad = grad, grad[cols].clone()
        opt.step()
        fresh.step()
        torch.testing.assert_close(old.detach()[cols], new.detach())
    assert (opt.state[old]["age"][:, 0] == 11).all() and (opt.state[old]["age"][cols] == 4).all()
