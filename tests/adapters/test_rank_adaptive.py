"""The rank-adaptive methods: DyLoRA's nested ranks and IncreLoRA's rank growth.

(Their contract — save/load, merge, disable, two adapters, mixed batch — is rows in test_contract.py; this file
checks what only they have.) Tolerances (fp32): exact where nothing may change (a component that must not move, an
inactive component's share of the delta); 1e-5 absolute where the same weights run another code path (a truncated
adapter, a loaded folder, PEFT); the contract's 1e-4 × max(1, max|output|) where a delta is folded into the base
weights.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splice
from splice.adapters import make_config
from splice.adapters.dylora import DyLoraAdapter, DyLoraConfig, set_dylora_rank, truncate_dylora
from splice.adapters.increlora import IncreLoraAdapter, IncreLoraConfig
from splice.adapters.inject import adapter_layers
from splice.adapters.lora import LoraAdapter, LoraConfig, module_dims
from splice.adapters.model import configs
from splice.train.loop import TrainConfig, train_loop
from splice.train.optim import ElementAgeAdamW

TARGETS = {"bert": ["query", "value", "intermediate.dense"], "gpt2": ["c_attn", "c_fc"]}


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def merge_tol(ref: torch.Tensor) -> float:
    return 1e-4 * max(1.0, ref.abs().max().item())


def adapters_of(model: nn.Module, cls: type, name: str = "default") -> dict[str, nn.Module]:
    return {path: layer.adapters[name] for path, layer in adapter_layers(model)
            if name in layer.adapters and isinstance(layer.adapters[name], cls)}


def with_weight_deltas(fam, deltas: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh base with `deltas` (module path → ΔW as an (out, in) matrix) added to its weights."""
    model = fam.build()
    state = model.state_dict()
    for path, dw in deltas.items():
        w = state[f"{path}.weight"]
        w += dw.t() if w.shape != dw.shape else dw  # HF Conv1D stores its weight as (in, out)
    model.load_state_dict(state)
    return model


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> None:
    """Move every trainable parameter off its init, B included, as training would."""
    g = torch.Generator().manual_seed(seed)
    for p in splice.trainable_parameters(model):
        p.add_(torch.randn(p.shape, generator=g) * 0.1)


def weighted_loss(fam, model: nn.Module, seed: int) -> torch.Tensor:
    out = fam.run(model, fam.batch(seed=seed))
    return (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum()


# -- DyLoRA -----------------------------------------------------------------------------------------------------------
def test_dylora_starts_at_the_base_and_trains_r_times_in_plus_out(tiny):
    fam = tiny["bert"]
    base_out = fam.output(fam.build())
    model = splice.adapt(fam.build(), DyLoraConfig(r=4, target_modules=TARGETS["bert"]))
    close(fam.output(model), base_out, atol=1e-6)
    assert all(d.materialize().abs().max() == 0 for d in splice.get_delta(model).values())
    # params_formula r·(in + out): per layer query and value 4·(32 + 32), intermediate 4·(32 + 64); two layers
    want = sum(4 * sum(module_dims(layer.base, layer.kind)) for _, layer in adapter_layers(model))
    assert want == 2 * (4 * 64 + 4 * 64 + 4 * 96) == 1792
    assert sum(p.numel() for p in splice.trainable_parameters(model)) == want


@pytest.mark.parametrize("family", ["bert", "gpt2"], ids=["linear", "conv1d"])
def test_dylora_every_truncated_rank_is_the_rank_b_product(tiny, tmp_path, family):
    """For each b in 1 … r the model equals the base plus ΔW_b = (α/b) B[:, :b] A[:b], through set_dylora_rank (the
    delta, merge and folder follow it) and through truncate_dylora (a plain LoRA of rank b, saved as PEFT LoRA)."""
    fam, r, alpha = tiny[family], 4, 6.0
    model = splice.adapt(fam.build(), DyLoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS[family]))
    randomise(model)
    dylora = adapters_of(model, DyLoraAdapter)
    full = {p: (torch.cat(list(a.lora_B), 1).detach(), torch.cat(list(a.lora_A), 0).detach())
            for p, a in dylora.items()}
    outputs = {}
    for b in range(1, r + 1):
        set_dylora_rank(model, b)
        out = outputs[b] = fam.output(model)
        ref = with_weight_deltas(fam, {p: alpha / b * B[:, :b] @ A[:b] for p, (B, A) in full.items()})
        close(out, fam.output(ref), atol=merge_tol(out))
        delta = splice.get_delta(model)
        assert {d.rank for d in delta.values()} == {b} and configs(model)["default"].eval_rank == b

        plain = truncate_dylora(copy.deepcopy(model), b)
        assert isinstance(configs(plain)["default"], LoraConfig) and configs(plain)["default"].r == b
        assert all(isinstance(a, LoraAdapter) for a in adapters_of(plain, LoraAdapter).values())
        assert sum(p.numel() for p in splice.trainable_parameters(plain)) == \
            sum(b * sum(module_dims(layer.base, layer.kind)) for _, layer in adapter_layers(plain))
        close(fam.output(plain), out)
        folder = splice.save_adapter(plain, tmp_path / f"lora-{b}")
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert saved["peft_type"] == "LORA" and saved["r"] == b and saved["lora_alpha"] == alpha
    assert len({round(o.abs().sum().item(), 4) for o in outputs.values()}) == r  # the ranks are distinct models

    import peft  # the truncated folder is a plain PEFT LoRA folder
    in_peft = peft.PeftModel.from_pretrained(fam.build(), tmp_path / "lora-2").eval()
    close(fam.output(in_peft), outputs[2])

    # The DyLoRA folder keeps every nested component: loaded at eval_rank 2, it can still go to any rank.
    set_dylora_rank(model, 2)
    folder = splice.save_adapter(model, tmp_path / "dylora")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["peft_type"] is None and saved["splice_method"] == "dylora" and saved["eval_rank"] == 2
    loaded = splice.load_adapter(fam.build(), folder)
    close(fam.output(loaded), outputs[2])
    set_dylora_rank(loaded, r)
    close(fam.output(loaded), outputs[r])


@pytest.mark.parametrize("frozen", [False, True], ids=["all-below-b", "frozen"])
def test_dylora_training_step_changes_only_components_up_to_the_drawn_rank(tiny, frozen):
    """At drawn rank b a step moves components ≤ b (only the b-th when frozen) and nothing above b, even with AdamW
    momentum and weight decay from earlier steps at higher ranks."""
    fam, r = tiny["bert"], 4
    model = splice.adapt(fam.build(), DyLoraConfig(r=r, frozen=frozen, target_modules=TARGETS["bert"]))
    randomise(model)
    model.train()
    dylora = list(adapters_of(model, DyLoraAdapter).values())
    opt = torch.optim.AdamW(splice.trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    for step, b in enumerate([4, 2, 1, 3, 1]):
        for a in dylora:
            a.train_rank = b
        before = [[(A.detach().clone(), B.detach().clone()) for A, B in zip(a.lora_A, a.lora_B)] for a in dylora]
        weighted_loss(fam, model, step).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for a, old in zip(dylora, before):
            for i, ((A0, B0), A, B) in enumerate(zip(old, a.lora_A, a.lora_B), start=1):
                moved = not torch.equal(A0, A) or not torch.equal(B0, B)
                should = i == b if frozen else i <= b
                assert moved == should, f"component {i} at drawn rank {b}: moved={moved}"


def test_dylora_rank_sampler_draws_one_seeded_uniform_rank_per_step(tiny):
    fam = tiny["bert"]
    model = splice.adapt(fam.build(), DyLoraConfig(r=4, r_min=2, eval_rank=3, seed=3,
                                                   target_modules=TARGETS["bert"]))
    dylora = list(adapters_of(model, DyLoraAdapter).values())

    def draws(config: DyLoraConfig, steps: int) -> list[int]:
        hook = config.training_hook(model, "default", steps)
        out = []
        for step in range(1, steps + 1):
            ranks = {a.train_rank for a in dylora}
            assert len(ranks) == 1  # one rank for the whole model
            out.append(ranks.pop())
            hook.after_step(step)
        return out

    config = configs(model)["default"]
    seq = draws(config, 600)
    assert {a.train_rank for a in dylora} == {None}  # after the last step: back to the full rank, not a stale b
    assert set(seq) == {2, 3, 4} and all(0.25 < seq.count(b) / len(seq) < 0.42 for b in (2, 3, 4))
    assert draws(config, 600) == seq  # seeded
    assert draws(DyLoraConfig(r=4, r_min=2, seed=4, target_modules=TARGETS["bert"]), 50) != seq[:50]
    # Outside training the drawn rank plays no part: the eval forward is at eval_rank.
    randomise(model)
    eval_out = fam.output(model)
    for a in dylora:
        a.train_rank = None
    assert torch.equal(fam.output(model), eval_out)
    set_dylora_rank(model, 3)
    assert torch.equal(fam.output(model), eval_out)


class Classifier(nn.Module):
    """The tiny BERT with a frozen linear head on its pooled output."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, 2).requires_grad_(False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=input_ids).pooler_output)


def toy_task(rows: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token rows labelled by whether token 7 occurs, in batches of 8."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (rows, 6), generator=g)
    ids[: rows // 2, 2] = 7
    labels = (ids == 7).any(1).long()
    return [(ids[i:i + 8], labels[i:i + 8]) for i in range(0, rows, 8)]


def train(model: nn.Module, encoder: nn.Module, hook, steps: int, lr: float = 1e-2) -> float:
    batches = toy_task()
    result = train_loop(splice.trainable_parameters(encoder), lambda epoch: batches,
                        lambda b: F.cross_entropy(model(b[0]), b[1]),
                        TrainConfig(max_steps=steps, lr=lr, warmup_ratio=0.0), len(batches), modules=[encoder],
                        hooks=[hook], progress=False)
    assert result.steps == steps
    return result.final_loss


def test_dylora_trains_inside_the_training_loop(tiny):
    fam = tiny["bert"]
    encoder = splice.adapt(fam.build(), DyLoraConfig(r=4, target_modules=TARGETS["bert"]))
    model = Classifier(encoder)
    config = configs(encoder)["default"]
    hook = config.training_hook(encoder, "default", 16)
    used, after_step = [], hook.after_step
    hook.after_step = lambda step: (used.append(hook.rank), after_step(step))
    assert torch.isfinite(torch.tensor(train(model, encoder, hook, 16)))
    assert len(used) == 16 and len(set(used)) >= 3  # ranks drawn inside the one loop, step after step
    outs = []
    for b in range(1, 5):  # every rank is a trained, distinct model
        set_dylora_rank(encoder, b)
        outs.append(fam.output(encoder))
    assert all((o - fam.output(fam.build())).abs().max() > 1e-4 for o in outs)


# -- IncreLoRA --------------------------------------------------------------------------------------------------------
def test_increlora_starts_at_the_base_and_counts_its_allocated_components(tiny):
    """params_formula counts what is allocated (max_r per module, what the optimizer holds); the components in use
    are counted separately."""
    fam = tiny["bert"]
    base_out = fam.output(fam.build())
    model = splice.adapt(fam.build(), IncreLoraConfig(r=4, target_modules=TARGETS["bert"]))
    close(fam.output(model), base_out, atol=1e-6)
    delta = splice.get_delta(model)
    assert all(d.materialize().abs().max() == 0 for d in delta.values())
    layers = [layer for _, layer in adapter_layers(model)]
    # max_r = 2r = 8: per layer 8·(32 + 32 + 1) twice and 8·(32 + 64 + 1); two layers
    allocated = sum(8 * (sum(module_dims(layer.base, layer.kind)) + 1) for layer in layers)
    assert allocated == 2 * (2 * 8 * 65 + 8 * 97) == 3632
    assert sum(p.numel() for p in splice.trainable_parameters(model)) == allocated
    increlora = adapters_of(model, IncreLoraAdapter)
    assert {(a.rank, a.reserve) for a in increlora.values()} == {(1, 2)}  # init_r 1, rank_step r/2 = 2 in reserve
    assert {d.rank for d in delta.values()} == {3}


def test_increlora_grows_the_most_important_module(tiny):
    fam = tiny["bert"]
    model = splice.adapt(fam.build(), IncreLoraConfig(r=2, init_r=1, rank_step=1, top_h=1, tinit=0, deltaT=1,
                                                      target_modules=TARGETS["bert"]))
    increlora = adapters_of(model, IncreLoraAdapter)
    hook = configs(model)["default"].training_hook(model, "default", 10)
    top = "encoder.layer.1.attention.self.value"
    for path, a in increlora.items():  # gradients on one module only: only it has a sensitivity
        for p in (a.lora_A, a.lora_E, a.lora_B):
            p.grad = torch.ones_like(p) if path == top else torch.zeros_like(p)
    with torch.no_grad():
        increlora[top].lora_E.fill_(0.5)
    hook.after_step(1)
    assert {p: a.rank for p, a in increlora.items() if a.rank > 1} == {top: 2}
    assert configs(model)["default"].rank_pattern[top] == 2


def growing(fam, advance: bool) -> tuple:
    """A BERT whose 6 modules grow from rank 1 to a budget of 24 over 20 steps (rank_step 2, every 2 steps)."""
    config = IncreLoraConfig(r=4, init_r=1, rank_step=2, top_h=2, tinit=2, deltaT=2, lora_alpha=8,
                             advance_learning=advance, target_modules=TARGETS["bert"])
    model = splice.adapt(fam.build(), config)
    return config, model, adapters_of(model, IncreLoraAdapter), config.training_hook(model, "default", 20)


@pytest.mark.parametrize("advance", [True, False], ids=["advance-learning", "no-advance"])
def test_increlora_grows_on_schedule_to_the_budget_and_never_beyond(tiny, advance):
    fam = tiny["bert"]
    config, model, increlora, hook = growing(fam, advance)
    budget = 4 * len(increlora)
    assert hook.budget == budget == 24 and hook.total == 6
    opt = torch.optim.AdamW(splice.trainable_parameters(model), lr=1e-2, weight_decay=0.0)
    totals = []
    for step in range(1, 21):
        model.train()
        (weighted_loss(fam, model, step) + hook.loss()).backward()
        opt.step()
        model.eval()
        before_total, before = hook.total, fam.output(model)
        hook.after_step(step)
        opt.zero_grad(set_to_none=True)
        totals.append(hook.total)
        grew = hook.total - before_total
        growth_step = step > 2 and step % 2 == 0
        assert 0 <= grew <= (2 * 2 if growth_step else 0)
        assert hook.total <= budget and all(a.rank <= a.capacity == 8 for a in increlora.values())
        if grew and not hook.done:
            close(fam.output(model), before, atol=1e-6)  # a new component starts without moving the function
        elif grew:  # the final growth drops the reserves (their fixed λ = 1e-5), a change of that order
            close(fam.output(model), before, atol=1e-4)
        # Inactive components add exactly nothing: the delta holds the components in use only, and moving the
        # others changes neither it nor the output.
        delta = splice.get_delta(model)
        out = fam.output(model)
        saved = {p: (a.lora_A.detach().clone(), a.lora_E.detach().clone(), a.lora_B.detach().clone())
                 for p, a in increlora.items()}
        with torch.no_grad():
            for a in increlora.values():
                k = a.in_use
                a.lora_A[k:].normal_()
                a.lora_E[k:].normal_()
                a.lora_B[:, k:].normal_()
        assert all(delta[f"{p}.weight"].rank == a.in_use for p, a in increlora.items())
        for name, d in splice.get_delta(model).items():
            assert torch.equal(d.materialize(), delta[name].materialize())
        assert torch.equal(fam.output(model), out)
        with torch.no_grad():
            for p, a in increlora.items():
                for t, old in zip((a.lora_A, a.lora_E, a.lora_B), saved[p]):
                    t.copy_(old)
    # the paper's schedule: nothing before tinit, then every deltaT steps, until the budget is spent
    assert totals[:3] == [6, 6, 6] and totals[-1] == budget and hook.done
    assert totals.index(budget) + 1 <= 2 + 2 * 6  # 18 components, at most 4 per growth (fewer where a cap bites)
    assert all(a.reserve == 0 for a in increlora.values())
    assert sum(config.rank_pattern.values()) == budget
    assert len({a.rank for a in increlora.values()}) > 1  # the ranks were allocated, not spread evenly


@pytest.mark.parametrize("advance", [True, False], ids=["advance-learning", "no-advance"])
def test_increlora_grown_components_start_their_adam_state_afresh(tiny, advance):
    """As the authors add a grown component's new tensors to the optimizer: its λ (and, entering the forward, its
    P and Q) restart at age 0 while every other entry keeps counting the run's steps."""
    fam = tiny["bert"]
    config, model, increlora, hook = growing(fam, advance)
    opt = hook.make_optimizer(splice.trainable_parameters(model), 1e-2, 0.0)
    hook.bind_optimizer(opt)
    assert isinstance(opt, ElementAgeAdamW)
    restarted = {id(t): torch.zeros(t.shape) for a in increlora.values() for t in (a.lora_A, a.lora_E, a.lora_B)}
    growths = 0
    for step in range(1, 21):
        (weighted_loss(fam, model, step) + hook.loss()).backward()
        opt.step()
        before = {p: (a.rank, a.in_use) for p, a in increlora.items()}
        hook.after_step(step)
        opt.zero_grad(set_to_none=True)
        for p, a in increlora.items():
            rank0, used0 = before[p]
            ages = {"A": opt.state[a.lora_A]["age"], "E": opt.state[a.lora_E]["age"],
                    "B": opt.state[a.lora_B]["age"].t()}  # B's components are its columns
            fresh = {name: (age == 0).all(dim=-1).nonzero().flatten().tolist() for name, age in ages.items()}
            if a.rank == rank0:
                assert fresh == {"A": [], "E": [], "B": []}, (step, p)
                continue
            growths += 1
            assert fresh["E"] == list(range(rank0, a.rank)), (step, p)
            # advance learning: P, Q of the new reserve (up to rank_step past the new rank), the rest already trained
            entered = (list(range(used0, min(a.rank + 2, a.capacity))) if advance else list(range(rank0, a.rank)))
            assert fresh["A"] == fresh["B"] == entered, (step, p)
            for t in (a.lora_A, a.lora_E, a.lora_B):  # the others count on from their own start
                age = opt.state[t]["age"]
                expected = step - restarted[id(t)]
                assert torch.equal(age[age != 0], expected[age != 0])
                restarted[id(t)] = torch.where(age == 0, float(step), restarted[id(t)])
    assert growths > 0 and hook.done


def test_increlora_growth_leaves_an_optimizer_without_per_element_ages_as_it_is(tiny):
    """A user's own ElementAgeAdamW with no element_age group steps the factors as torch's AdamW does: growth has
    no ages to restart there, and must not stop the run."""
    fam = tiny["bert"]
    config, model, increlora, hook = growing(fam, True)
    opt = ElementAgeAdamW(splice.trainable_parameters(model), lr=1e-2, weight_decay=0.0)
    hook.bind_optimizer(opt)
    assert not opt.ages(next(iter(increlora.values())).lora_E)
    for step in range(1, 21):
        (weighted_loss(fam, model, step) + hook.loss()).backward()
        opt.step()
        hook.after_step(step)
        opt.zero_grad(set_to_none=True)
    assert hook.done and all(opt.state[a.lora_E]["age"].item() == 20 for a in increlora.values())


def test_increlora_trains_inside_the_training_loop_then_saves_and_merges(tiny, tmp_path):
    fam = tiny["bert"]
    encoder = splice.adapt(fam.build(), IncreLoraConfig(r=2, target_modules=TARGETS["bert"]))
    model = Classifier(encoder)
    config = configs(encoder)["default"]
    hook = config.training_hook(encoder, "default", 30)
    # Unset, the schedule comes from the run: top_h ⌈6 / 8⌉ = 1, rank_step 1, six growths ending by step 12.
    assert (hook.top_h, config.step_size, config.deltaT, config.tinit) == (1, 1, 1, 1)
    assert hook.loss().item() > 0
    assert torch.isfinite(torch.tensor(train(model, encoder, hook, 30)))
    increlora = adapters_of(encoder, IncreLoraAdapter)
    assert hook.done and hook.total == 12 == sum(config.rank_pattern.values())
    assert all(a.reserve == 0 and a.in_use == a.rank for a in increlora.values())
    out = fam.output(encoder)
    assert (out - fam.output(fam.build())).abs().max() > 1e-4

    folder = splice.save_adapter(encoder, tmp_path / "increlora")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["peft_type"] is None and saved["splice_method"] == "increlora"
    assert saved["rank_pattern"] == config.rank_pattern
    loaded = splice.load_adapter(fam.build(), folder)
    close(fam.output(loaded), out)
    assert {p: a.rank for p, a in adapters_of(loaded, IncreLoraAdapter).items()} == config.rank_pattern
    merged = splice.merge_and_unload(loaded)
    close(fam.output(merged), out, atol=merge_tol(out))


# -- invalid configs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, fields, field", [
    ("dylora", dict(r=4, r_min=5), "r_min"),
    ("dylora", dict(r=4, eval_rank=5), "eval_rank"),
    ("dylora", dict(r=0), "r"),
    ("dylora", dict(frozen="yes"), "frozen"),
    ("increlora", dict(r=2, init_r=3), "r"),  # the budget is smaller than the initial ranks
    ("increlora", dict(r=8, max_r=6), "max_r"),
    ("increlora", dict(rank_step=0), "rank_step"),
    ("increlora", dict(tinit=-1), "tinit"),
    ("increlora", dict(beta1=1.0), "beta1"),
])
def test_invalid_configs_fail_at_config_time_with_one_line(method, fields, field):
    with pytest.raises(splice.SpliceError) as info:
        make_config(method, **fields)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{field}:"), msg


@pytest.mark.parametrize("method, fields, field", [("dylora", dict(r=33), "r"),
                                                   ("increlora", dict(r=8, max_r=40), "max_r"),
                                                   ("increlora", dict(r=40, init_r=33), "init_r")])
def test_rank_larger_than_the_layer_is_refused_before_touching_the_model(tiny, method, fields, field):
    model = tiny["bert"].build()
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(splice.SpliceError) as info:
        splice.adapt(model, make_config(method, target_modules=["query"], **fields))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{field}:") and "larger than the layer (32 → 32)" in msg, msg
    assert {n: type(m) for n, m in model.named_modules()} == types and splice.active_adapters(model) == []


def test_unknown_option_names_the_closest_field():
    with pytest.raises(splice.SpliceError, match="unknown config key 'rmin'.*'r_min'"):
        make_config("dylora", rmin=2)
    with pytest.raises(splice.SpliceError, match="unknown config key 'top_k'.*'top_h'"):
        make_config("increlora", top_k=2)


def test_truncate_and_set_rank_refuse_other_methods_and_bad_ranks(tiny):
    model = splice.adapt(tiny["bert"].build(), DyLoraConfig(r=4, target_modules=["query"]))
    splice.adapt(model, splice.LoraConfig(r=2, target_modules=["query"]), "other")
    for call in (lambda: set_dylora_rank(model, 5), lambda: truncate_dylora(model, 0),
                 lambda: truncate_dylora(model, 2, "other"), lambda: set_dylora_rank(model, 2, "missing")):
        with pytest.raises(splice.SpliceError) as info:
            call()
        assert "\n" not in str(info.value)
    splice.merge_adapter(model, "default")
    with pytest.raises(splice.SpliceError, match="merged"):
        set_dylora_rank(model, 2)


@pytest.mark.parametrize("method", ["adalora", "increlora"])
def test_a_config_reused_for_a_second_run_takes_that_runs_schedule(tiny, method):
    """total_step (and IncreLoRA's derived deltaT/tinit) are written into the config for the saved folder; a second
    run with the same config object derives them from its own length instead of keeping the first run's, while a
    value the user set is kept."""
    fam = tiny["bert"]
    fields = dict(target_modules=["query", "value"], **({"init_r": 4, "target_r": 2, "tfinal": 2}
                                                           if method == "adalora" else {"r": 2}))
    config = make_config(method, **fields)
    for steps in (40, 400):
        model = splice.adapt(fam.build(), config)
        configs(model)["default"].training_hook(model, "default", steps)
        assert configs(model)["default"].total_step == steps
    if method == "increlora":
        derived = dict(config.__dict__)
        fresh = make_config(method, **fields)
        model = splice.adapt(fam.build(), fresh)
        configs(model)["default"].training_hook(model, "default", 400)
        assert (derived["deltaT"], derived["tinit"]) == (fresh.deltaT, fresh.tinit)  # as a config used once
    fixed = make_config(method, **fields, total_step=50)
    for steps in (40, 400):
        model = splice.adapt(fam.build(), fixed)
        configs(model)["default"].training_hook(model, "default", steps)
        assert configs(model)["default"].total_step == 50
