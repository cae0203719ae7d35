"""AdaLoRA's rank allocation against PEFT's: the same budget schedule, and, on the same weights and the same
gradients, the same triplets pruned at every step, the same regulariser, and pruned folders that load both ways.

(The per-method contract and output parity are rows in test_contract.py / test_peft_parity.py; this is what only
AdaLoRA has.) Tolerance: 1e-5 absolute on outputs (fp32).
"""
from __future__ import annotations

import peft
import torch

import splice
from splice.adapters import make_config
from splice.adapters.model import configs

FIELDS = dict(init_r=4, target_r=2, lora_alpha=8, tinit=1, tfinal=3, deltaT=2, total_step=9,
              target_modules=["query", "value", "intermediate.dense"])


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_budget_schedule_matches_peft(tiny):
    theirs = peft.get_peft_model(tiny["bert"].build(), peft.AdaLoraConfig(**FIELDS)).base_model.rankallocator
    ours = splice.adapt(tiny["bert"].build(), make_config("adalora", **FIELDS))
    allocator = configs(ours)["default"].training_hook(ours, "default", 9)
    assert (allocator.init_budget, allocator.target_budget) == (theirs.init_bgt, theirs.target_bgt) == (24, 12)
    budgets = [allocator.budget(step) for step in range(12)]
    assert budgets == [theirs.budget_schedule(step) for step in range(12)]
    assert budgets[0] == (24, False) and budgets[-1] == (12, True) and len({b for b, _ in budgets}) > 3


def test_rank_allocation_matches_peft_step_for_step(tiny, tmp_path):
    fam = tiny["bert"]
    torch.manual_seed(0)  # PEFT draws A and B from the global generator: a fixed start makes the run reproducible
    theirs = peft.get_peft_model(fam.build(), peft.AdaLoraConfig(**FIELDS))
    with torch.no_grad():  # λ starts at 0; give it values so that every triplet has a gradient and a score
        for n, p in theirs.named_parameters():
            if "lora_E" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    theirs.save_pretrained(tmp_path / "start")
    ours = splice.load_adapter(fam.build(), tmp_path / "start", is_trainable=True)
    config = configs(ours)["default"]
    allocator = config.training_hook(ours, "default", FIELDS["total_step"])
    regulariser_theirs = 0.0
    for n, p in theirs.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            regulariser_theirs += torch.norm(cov - torch.eye(cov.shape[0]), p="fro") / 12  # 6 modules × (A, B)
    close(allocator.loss(), FIELDS.get("orth_reg_weight", 0.5) * regulariser_theirs)

    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    opt_ours = torch.optim.SGD(splice.trainable_parameters(ours), lr=0.5)
    weights = torch.randn(fam.output(ours).shape, generator=torch.Generator().manual_seed(0))
    kept = []
    for step in range(1, 12):  # past total_step: the final allocation must stay fixed
        batch = fam.batch(seed=step)
        for model, opt in ((theirs, opt_theirs), (ours, opt_ours)):
            (fam.run(model, batch) * weights).sum().backward()
            opt.step()
        theirs.base_model.update_and_allocate(step)
        allocator.after_step(step)
        opt_theirs.zero_grad()
        opt_ours.zero_grad()
        close(fam.output(ours), fam.output(theirs))
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern is not None:
            assert {k.replace(".default", ""): v for k, v in pattern.items()} == config.rank_pattern
            kept.append(sum(sum(v) for v in config.rank_pattern.values()))
    assert kept[-1] == 12 and kept[0] > 12  # pruned down to target_r per module, through intermediate budgets

    theirs.save_pretrained(tmp_path / "peft")  # holds only the surviving triplets
    reloaded = splice.load_adapter(fam.build(), tmp_path / "peft")
    close(fam.output(reloaded), fam.output(theirs))
    splice.save_adapter(ours, tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(fam.build(), tmp_path / "ours").eval()
    close(fam.output(in_peft), fam.output(ours))
    assert sum(d.rank for d in splice.get_delta(ours, "default").values()) == 12  # the delta drops pruned triplets


def test_adalora_with_nothing_to_prune_trains_and_its_folder_loads(tiny, tmp_path):
    # target_r == init_r gave kthvalue(k=0), a RuntimeError; an adapter saved before training wrote total_step 1,
    # which neither splice nor PEFT would load (tinit + tfinal do not fit).
    from splice.train.loop import TrainConfig, train_loop

    fam = tiny["bert"]
    model = splice.adapt(fam.build(), splice.adapters.make_config("adalora", init_r=4, target_r=4, tinit=1, tfinal=1,
                                                                  target_modules=["query"]))
    splice.save_adapter(model, tmp_path / "untrained")
    splice.load_adapter(fam.build(), tmp_path / "untrained")
    batch = fam.batch()
    config = splice.adapters.model.configs(model)["default"]
    train_loop(splice.trainable_parameters(model), lambda e: [batch] * 4, lambda b: fam.run(model, b).pow(2).mean(),
               TrainConfig(epochs=1, lr=1e-3), 4, modules=[model], hooks=[config.training_hook(model, "default", 4)],
               progress=False)
