"""The defining properties of the sparse fine-tuning methods (SaRA, SpIEL, S2FT, PaCA) and NOLA, each on a
constructed case; the contract matrix (test_contract.py) covers save/load, merge, mixed batches and the rest.

Tolerances (fp32): exact equality where nothing but zeros was added; 1e-5 absolute where the same weights run
another code path; 1e-4 × max(1, max|output|) where weights were folded into the base (merge).
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import splice
from splice.adapters import make_config
from splice.adapters.inject import adapter_layers
from splice.adapters.model import configs
from splice.train.loop import TrainConfig, train_loop
from splice.train.optim import ElementAgeAdamW

METHODS = ["sara", "spiel", "s2ft", "paca", "nola"]


def layers(model: nn.Module, name: str = "default") -> list[tuple[str, nn.Module, nn.Module]]:
    """(module name, base module, adapter) for every module adapter `name` wraps."""
    return [(path, layer.base, layer.adapters[name]) for path, layer in adapter_layers(model) if name in layer.adapters]


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(splice.SpliceError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    return msg


def train(model: nn.Module, tiny, steps: int, lr: float = 0.05, hooks=(), name: str = "default") -> None:
    """`steps` steps of the one training loop on a fixed regression target (random, seeded)."""
    fam = tiny["bert"] if hasattr(model, "pooler") else tiny["gpt2"]
    batch = fam.batch(rows=4)
    target = torch.randn(fam.output(model, batch).shape, generator=torch.Generator().manual_seed(3))

    def loss(b):
        return (fam.run(model, b) - target).pow(2).mean()

    config = TrainConfig(lr=lr, max_steps=steps, warmup_ratio=0.0, max_grad_norm=0.0)
    train_loop(splice.trainable_parameters(model, name), lambda epoch: [batch] * steps, loss, config, steps,
               modules=[model], hooks=list(hooks), progress=False)


# -- every method -------------------------------------------------------------------------------------------------
SMALL = {"sara": {}, "spiel": dict(density=0.05), "s2ft": {}, "paca": dict(r=4), "nola": dict(r=4)}


@pytest.mark.parametrize("method", METHODS)
def test_the_adapted_model_equals_the_base_at_init(tiny, method):
    fam = tiny["bert"]
    model = fam.build()
    base_out = fam.output(model)
    splice.adapt(model, make_config(method, **SMALL[method]))
    assert torch.equal(fam.output(model), base_out)
    delta = splice.get_delta(model)
    assert all(d.materialize().abs().max() == 0 for d in delta.values())


def expected_count(method: str, config, path: str, in_f: int, out_f: int) -> int:
    """The trainable numbers of one module by the method's params_formula, computed here independently."""
    if method == "sara":
        return math.ceil(config.fraction * in_f * out_f)
    if method == "spiel":
        return math.ceil(config.density * in_f * out_f)
    if method == "paca":
        return config.r * out_f
    if method == "nola":
        return config.num_basis_A + config.num_basis_B
    rows = any(path.endswith("." + m) for m in config.row_modules)
    heads = config.head_dim if config.head_dim and any(path.endswith("." + m) for m in config.head_modules) else 1
    side, other = (out_f, in_f) if rows else (in_f, out_f)
    return math.ceil(config.ratio * side / heads) * heads * other


@pytest.mark.parametrize("method, fields", [
    ("sara", dict(fraction=0.15, target_modules="all-linear")),
    ("spiel", dict(density=0.03)),
    ("s2ft", {}),
    ("s2ft", dict(ratio=0.3, head_dim=16, target_modules=["query", "value", "attention.output.dense",
                                                           "intermediate.dense", "output.dense"])),
    ("paca", dict(target_modules=["query", "intermediate.dense", "output.dense"])),
    ("nola", dict(num_basis_A=100, num_basis_B=60)),
], ids=["sara", "spiel", "s2ft-default", "s2ft-heads-rows", "paca", "nola"])
def test_trainable_count_equals_params_formula(tiny, method, fields):
    model = tiny["bert"].build()
    config = make_config(method, **fields)
    splice.adapt(model, config)
    want = 0
    for path, base, adapter in layers(model):
        n = sum(p.numel() for p in adapter.parameters())
        assert n == expected_count(method, config, path, base.in_features, base.out_features), path
        want += n
    assert sum(p.numel() for p in splice.trainable_parameters(model)) == want
    assert want == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert type(config).params_formula


# -- SaRA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name, targets", [("bert", "all-linear"), ("gpt2", ["c_attn", "c_fc"])])
def test_sara_retrains_exactly_the_smallest_weights(tiny, model_name, targets):
    model = tiny[model_name].build()
    splice.adapt(model, splice.SaraConfig(fraction=0.2, target_modules=targets))
    for path, base, adapter in layers(model):
        magnitude = base.weight.detach().abs().flatten()
        chosen = torch.zeros_like(magnitude, dtype=torch.bool)
        chosen[adapter.index] = True
        assert int(chosen.sum()) == math.ceil(0.2 * magnitude.numel()), path
        assert magnitude[chosen].max() <= magnitude[~chosen].min(), path
        assert adapter.threshold == magnitude[chosen].max().item()


def test_sara_penalty_is_the_nuclear_norm_of_one_module_update(tiny):
    model = tiny["bert"].build()
    config = splice.SaraConfig(lambda_rank=0.01, target_modules=["query", "value"])
    splice.adapt(model, config)
    trainer = config.training_hook(model, "default", total_steps=10)
    zero = trainer.loss()  # ΔW = 0: the penalty is 0 and its (sub)gradient finite
    zero.backward()
    assert zero.item() == 0.0
    assert all(torch.isfinite(a.values.grad).all() for _, _, a in layers(model) if a.values.grad is not None)
    with torch.no_grad():
        for _, _, adapter in layers(model):
            adapter.values.normal_()
    draw = trainer.generator.get_state()
    penalty = trainer.loss()
    trainer.generator.set_state(draw)
    picked = int(torch.randint(len(trainer.modules), (1,), generator=trainer.generator))
    base, adapter = trainer.modules[picked]
    dense = torch.zeros(base.weight.numel()).index_add(0, adapter.index, adapter.values.detach()).view_as(base.weight)
    torch.testing.assert_close(penalty.detach(), 0.01 * torch.linalg.matrix_norm(dense, ord="nuc"), atol=1e-5,
                               rtol=1e-5)


def test_sara_progressive_adjustment_freezes_entries_grown_past_the_threshold(tiny):
    model = tiny["bert"].build()
    config = splice.SaraConfig(fraction=0.1, lambda_rank=0.0, progressive_at=0.5,
                               target_modules=["layer.0.attention.self.query"])
    splice.adapt(model, config)
    _, base, adapter = layers(model)[0]
    k = adapter.values.numel()
    with torch.no_grad():  # push the first half of the entries well past the threshold, leave the rest small
        adapter.values[: k // 2] = 10 * adapter.threshold
    grown = base.weight.detach().flatten()[adapter.index[: k // 2]] + adapter.values[: k // 2]
    assert (grown.abs() > adapter.threshold).all()
    trainer = config.training_hook(model, "default", total_steps=8)
    assert trainer.adjust_step == 4
    trainer.after_step(3)
    assert adapter.frozen_values is None
    trainer.after_step(4)
    frozen = ~torch.isnan(adapter.frozen_values)
    assert frozen[: k // 2].all() and not frozen[k // 2:].any()
    before = adapter.current_values().detach().clone()
    # the optimizer's parameter set stays the same k values; frozen entries no longer move, the others train
    assert [p.numel() for p in splice.trainable_parameters(model)] == [k]
    train(model, tiny, steps=3, lr=0.05)
    after = adapter.current_values().detach()
    assert torch.equal(after[frozen], before[frozen])
    assert (after[~frozen] != before[~frozen]).all()
    sparse = splice.get_delta(model)["encoder.layer.0.attention.self.query.weight"]
    torch.testing.assert_close(sparse.values, after)


# -- SpIEL --------------------------------------------------------------------------------------------------------
class Watch:
    """A training hook placed before SpIEL's: records the accumulated gradient at the end of each window and
    checks, after SpIEL's own update of the previous step, that every module holds exactly k distinct entries."""

    def __init__(self, model, spiel):
        self.model, self.spiel, self.sums, self.history = model, spiel, {}, []

    def after_step(self, step: int) -> None:
        for path, base, adapter in layers(self.model):
            k = math.ceil(0.05 * base.weight.numel())
            assert adapter.values.numel() == k and adapter.index.numel() == k, (step, path)
            assert torch.unique(adapter.index).numel() == k, (step, path)
            if adapter.grad_sum is not None:
                self.sums[path] = (adapter.grad_sum.clone(), adapter.grad_sq.clone(), adapter.grad_count)
        self.history.append({p: (a.index.clone(), a.values.detach().clone()) for p, _, a in layers(self.model)})


def test_spiel_keeps_exactly_k_entries_through_index_updates_and_resets_moved_ones(tiny):
    model = tiny["bert"].build()
    config = splice.SpielConfig(density=0.05, reselection_steps=4, selection_accumulation_steps=2,
                                initial_reselection_rate=0.5)
    splice.adapt(model, config)
    initial = {p: a.index.clone() for p, _, a in layers(model)}
    spiel = config.training_hook(model, "default", total_steps=11)
    watch = Watch(model, spiel)
    moved: dict[int, dict] = {}
    original_update = spiel.update

    def update(step: int) -> int:  # record the accumulated statistics the update uses, then let it run
        stats = {p: (a.grad_sum.clone(), a.grad_sq.clone(), a.grad_count) for p, _, a in layers(model)}
        before = {p: a.index.clone() for p, _, a in layers(model)}
        n = original_update(step)
        state = spiel.optimizer.state
        moved[step] = {"stats": stats, "before": before, "n": n, "optimizer": spiel.optimizer,
                       "age": {p: state[a.values]["age"].clone() for p, _, a in layers(model)},
                       "exp_avg": {p: state[a.values]["exp_avg"].clone() for p, _, a in layers(model)},
                       "exp_avg_sq": {p: state[a.values]["exp_avg_sq"].clone() for p, _, a in layers(model)}}
        return n

    spiel.update = update
    train(model, tiny, steps=11, lr=0.05, hooks=[spiel, watch])
    assert sorted(moved) == [2, 6, 10]  # the end of each accumulation window (steps 1–2, 5–6, 9–10)
    # the loop took SpIEL's own optimizer: AdamW with an age per value, as the reference's SftAdamW
    assert all(isinstance(m["optimizer"], ElementAgeAdamW) for m in moved.values())
    for path, base, adapter in layers(model):
        k = adapter.values.numel()
        first = moved[2]
        # the first update re-chooses the whole set: the k entries of largest accumulated |gradient|
        grad_sum = first["stats"][path][0]
        assert set(watch.history[1][path][0].tolist()) == set(torch.topk(grad_sum.abs(), k).indices.tolist())
        assert not torch.equal(watch.history[1][path][0].sort().values, initial[path])
        # per slot, the step it last restarted at: 2 for the slots the first update moved; a slot kept since the
        # start counts every step (as if restarted at 1 with no age)
        restarted_at = torch.where(initial[path] != watch.history[1][path][0], 2, 1)
        for step in (6, 10):
            before, after = moved[step]["before"][path], watch.history[step - 1][path][0]
            changed = before != after
            rate = 0.5 * (1 - step / 11)
            assert int(changed.sum()) <= int(k * rate)
            # the moved slots start again from 0 (their old delta is reset: W is back to W₀ there)
            assert (watch.history[step - 1][path][1][changed] == 0).all()
            # ... with the reference's state: the raw accumulated means, aged by the window's 2 steps (stored as
            # 1, the next step counting first), while the others count on from their last restart
            restarted_at = torch.where(changed, step, restarted_at)
            torch.testing.assert_close(moved[step]["age"][path], (step - restarted_at + 1).float())
            grad_sum, grad_sq, count = moved[step]["stats"][path]
            assert count == 2
            torch.testing.assert_close(moved[step]["exp_avg"][path][changed], grad_sum[after[changed]] / count)
            torch.testing.assert_close(moved[step]["exp_avg_sq"][path][changed], grad_sq[after[changed]] / count)
        assert len(set(adapter.index.tolist())) == k
    assert moved[6]["n"] > 0


def test_spiel_update_resets_optimizer_state_of_moved_slots(tiny):
    model = tiny["bert"].build()
    splice.adapt(model, splice.SpielConfig(density=0.1, target_modules=["query"]))
    _, base, adapter = layers(model)[0]
    optimizer = torch.optim.AdamW(splice.trainable_parameters(model), lr=0.01)
    adapter.accumulate(True)
    batch = tiny["bert"].batch()
    for _ in range(2):
        tiny["bert"].run(model, batch).pow(2).mean().backward()
        optimizer.step()
    assert adapter.grad_count == 2
    grad_sum, grad_sq = adapter.grad_sum.clone(), adapter.grad_sq.clone()
    with torch.no_grad():
        adapter.values.copy_(torch.linspace(0.1, 1, adapter.values.numel()))  # the first 10 slots are the smallest
    dropped_values = torch.arange(10)
    old_positions = adapter.index.clone()
    slots = adapter.move_entries(10, optimizer)
    assert slots.numel() > 0 and set(slots.tolist()) <= set(dropped_values.tolist())
    new = adapter.index[slots]
    assert not torch.isin(new, old_positions).any()
    assert (adapter.values.detach()[slots] == 0).all()
    state = optimizer.state[adapter.values]
    torch.testing.assert_close(state["exp_avg"][slots], grad_sum[new] / 2)
    torch.testing.assert_close(state["exp_avg_sq"][slots], grad_sq[new] / 2)
    # the positions dropped from the set no longer change W
    delta = splice.get_delta(model)["encoder.layer.0.attention.self.query.weight"].materialize().flatten()
    gone = old_positions[~torch.isin(old_positions, adapter.index)]
    assert gone.numel() == slots.numel() and (delta[gone] == 0).all()


def test_spiel_module_no_backward_reached_keeps_its_entries(tiny):
    model = tiny["bert"].build()
    config = splice.SpielConfig(density=0.1, reselection_steps=2, selection_accumulation_steps=1,
                                target_modules=["query", "pooler.dense"])
    splice.adapt(model, config)
    spiel = config.training_hook(model, "default", total_steps=4)
    batch = tiny["bert"].batch()
    model(**batch).last_hidden_state.pow(2).mean().backward()  # the pooler takes no part in this loss
    pooler = next(a for p, _, a in layers(model) if p == "pooler.dense")
    before = pooler.index.clone()
    assert spiel.update(1) > 0  # the first update: every used module re-chooses its whole set
    assert torch.equal(pooler.index, before)


def test_spiel_regrowth_reads_the_dense_weight_gradient(tiny):
    """The accumulated gradient is the gradient of the loss with respect to the full weight matrix."""
    fam = tiny["gpt2"]
    model = fam.build()
    splice.adapt(model, splice.SpielConfig(density=0.1, target_modules=["c_fc"]))
    path, base, adapter = layers(model)[0]
    adapter.accumulate(True)
    batch = fam.batch()
    fam.run(model, batch).pow(2).mean().backward()
    # the same loss with the base weight itself trainable (the adapter's values are 0, so W = W₀)
    ref = fam.build()
    ref.get_submodule(path).weight.requires_grad_(True)
    fam.run(ref, batch).pow(2).mean().backward()
    torch.testing.assert_close(adapter.grad_sum.view_as(base.weight), ref.get_submodule(path).weight.grad,
                               atol=1e-6, rtol=1e-5)


# -- S2FT and PaCA ------------------------------------------------------------------------------------------------
def math_delta(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each wrapped module's ΔW as the (out, in) matrix the layer computes with (Conv1D stores it transposed)."""
    out = {}
    for tensor, d in splice.get_delta(model).items():
        module = tensor.removesuffix(".weight")
        dense = d.materialize()
        out[module] = dense.t() if model.get_submodule(module).kind == "conv1d" else dense
    return out


@pytest.mark.parametrize("method, model_name, fields", [
    ("paca", "bert", dict(r=3, target_modules=["query", "output.dense"])),
    ("paca", "gpt2", dict(r=3, target_modules=["c_attn", "c_proj"])),
    ("s2ft", "bert", dict(ratio=0.2, head_dim=16, target_modules=["query", "attention.output.dense", "output.dense",
                                                                   "intermediate.dense"])),
    ("s2ft", "gpt2", dict(ratio=0.2, head_dim=16, target_modules=["c_attn", "c_proj", "c_fc"])),
], ids=["paca-bert", "paca-gpt2-conv1d", "s2ft-bert", "s2ft-gpt2-conv1d"])
def test_training_changes_only_the_selected_columns_or_rows(tiny, method, model_name, fields):
    fam = tiny[model_name]
    model = fam.build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    splice.adapt(model, make_config(method, **fields))
    train(model, tiny, steps=3, lr=0.05)
    model.eval()
    assert all(torch.equal(p, before[n]) for n, p in fam.build().named_parameters() if n in before)
    deltas = math_delta(model)
    for path, base, adapter in layers(model):
        dense = deltas[path]
        chosen = torch.zeros(dense.shape[1] if adapter.axis == "in" else dense.shape[0], dtype=torch.bool)
        chosen[adapter.index] = True
        lines = dense if adapter.axis == "out" else dense.t()  # one line per chosen unit
        assert (lines[~chosen] == 0).all(), path
        assert (lines[chosen].abs().amax(1) > 0).all(), path
        if method == "s2ft" and adapter.index.numel() > 1 and path.endswith(("query", "attention.output.dense",
                                                                             "c_attn", "attn.c_proj")):
            heads = adapter.index.view(-1, 16)  # whole heads: runs of 16 consecutive channels from a multiple of 16
            assert (heads[:, 0] % 16 == 0).all() and (heads.diff(dim=1) == 1).all()
    out = fam.output(model)
    splice.merge_adapter(model, "default")
    merged = fam.output(model)
    torch.testing.assert_close(merged, out, atol=1e-4 * max(1.0, out.abs().max().item()), rtol=0)


def test_paca_keeps_only_the_selected_input_columns_for_backward(tiny):
    model = tiny["bert"].build()
    splice.adapt(model, splice.PacaConfig(r=3, target_modules=["intermediate.dense"]))
    _, base, adapter = layers(model)[0]
    x = torch.randn(2, 5, base.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        adapter._branch(x)
    # F.linear flattens the leading dims: the input it keeps is (10, 3), the three chosen columns of the 10 rows
    assert not any(math.prod(shape) >= 10 * base.in_features for shape in saved)
    assert (10, 3) in saved


@pytest.mark.parametrize("in_features", [40, 2000])
def test_slice_delta_is_exact_in_the_smaller_form(in_features):
    from splice.adapters.sparse import slice_delta
    from splice.delta.forms import LowRank, Sparse

    g = torch.Generator().manual_seed(0)
    block, idx = torch.randn(64, 3, generator=g), torch.tensor([1, 7, 30])
    d = slice_delta(block, idx, "in", 0.5, "linear", torch.Size((64, in_features)))
    assert isinstance(d, LowRank if in_features < 2 * 64 else Sparse)
    want = torch.zeros(64, in_features)
    want[:, idx] = 0.5 * block
    assert torch.equal(d.materialize(), want)


# -- NOLA ---------------------------------------------------------------------------------------------------------
def test_nola_bases_are_reproducible_from_the_seed_and_not_saved(tiny, tmp_path):
    from splice.adapters.nola import random_bases

    config = splice.NolaConfig(r=4, num_basis_A=50, num_basis_B=30, seed=7,
                               target_modules=["query", "intermediate.dense"])
    one, two = tiny["bert"].build(), tiny["bert"].build()
    splice.adapt(one, config)
    splice.adapt(two, dataclasses.replace(config))
    bases_one, bases_two = layers(one)[0][2].bases, layers(two)[0][2].bases
    assert bases_one.A.shape == (50, 4, 32) and bases_one.B.shape == (30, 64, 4)  # sized for the largest layer
    A, B = random_bases(config, 32, 64)
    assert torch.equal(bases_one.A, A) and torch.equal(bases_one.B, B)
    assert torch.equal(bases_two.A, A) and torch.equal(bases_two.B, B)
    assert all(a.bases is bases_one for _, _, a in layers(one))  # one set shared by every module
    other = random_bases(splice.NolaConfig(r=4, num_basis_A=50, num_basis_B=30, seed=8), 32, 64)
    assert not torch.equal(other[0], A)

    with torch.no_grad():
        for _, _, adapter in layers(one):
            adapter.nola_beta.normal_()
    path = splice.save_adapter(one, tmp_path / "nola")
    keys = load_file(str(path / "adapter_model.safetensors")).keys()
    assert keys and all(k.endswith(("nola_alpha", "nola_beta")) for k in keys)
    fresh = tiny["bert"].build()
    splice.load_adapter(fresh, path)
    torch.testing.assert_close(tiny["bert"].output(fresh), tiny["bert"].output(one), atol=1e-5, rtol=0)


def test_nola_only_the_coefficients_receive_gradients(tiny):
    model = tiny["bert"].build()
    splice.adapt(model, splice.NolaConfig(r=4, num_basis_A=20, num_basis_B=10))
    model.train()
    tiny["bert"].run(model, tiny["bert"].batch()).pow(2).mean().backward()
    with_grad = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"nola_alpha", "nola_beta"}
    for _, _, adapter in layers(model):
        assert not adapter.bases.A.requires_grad and adapter.bases.A.grad is None
        # ΔW = 0 at the start, yet β learns: A is a random mixture, B = 0
        assert adapter.nola_beta.grad.abs().max() > 0 and adapter.nola_alpha.grad.abs().max() == 0
    counted = {p.numel() for p in splice.trainable_parameters(model)}
    assert counted == {20, 10}


# -- saved configs ------------------------------------------------------------------------------------------------
def test_a_splice_only_config_round_trips_through_the_folder(tiny, tmp_path):
    config = splice.S2FTConfig(ratio=0.3, head_dim=16, row_modules=["query"], seed=5,
                               target_modules=["query", "output.dense"])
    model = splice.adapt(tiny["bert"].build(), config)
    path = splice.save_adapter(model, tmp_path / "s2ft")
    written = json.loads((path / "adapter_config.json").read_text())
    assert written["peft_type"] is None and written["splice_method"] == "s2ft"
    assert written["ratio"] == 0.3 and written["head_dim"] == 16 and written["row_modules"] == ["query"]
    fresh = tiny["bert"].build()
    splice.load_adapter(fresh, path)
    assert configs(fresh)["default"] == config
    assert [a.index.tolist() for _, _, a in layers(fresh)] == [a.index.tolist() for _, _, a in layers(model)]


@pytest.mark.parametrize("method, fields, key, bad", [
    ("sara", dict(target_modules=["query"]), "sara_indices", "outside"),
    ("spiel", dict(density=0.1, target_modules=["query"]), "spiel_indices", "repeat"),
    ("paca", dict(r=2, target_modules=["query"]), "paca_indices", "outside"),
    ("s2ft", dict(ratio=0.1, row_modules=["query"], target_modules=["query"]), "s2ft_indices", "outside"),
    ("shira", dict(r=1, target_modules=["query"]), "shira_indices", "outside"),
])
def test_a_folder_with_bad_positions_is_refused(tiny, tmp_path, method, fields, key, bad):
    from safetensors.torch import save_file

    path = splice.save_adapter(splice.adapt(tiny["bert"].build(), make_config(method, **fields)), tmp_path / "a")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    name = next(k for k in tensors if k.endswith(key))
    index = tensors[name].clone()
    index[0] = 10_000 if bad == "outside" else index[1]
    save_file({**tensors, name: index}, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = tiny["bert"].build()
    types = {n: type(m) for n, m in model.named_modules()}
    msg = error(splice.load_adapter, model, path)
    assert key in msg and bad in msg
    # refused before anything was wrapped or frozen
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(p.requires_grad for p in model.parameters())


# -- invalid configs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, fields, field", [
    ("sara", dict(fraction=0.0), "fraction"), ("sara", dict(fraction=1.5), "fraction"),
    ("sara", dict(fraction=-0.1), "fraction"), ("sara", dict(fraction="10%"), "fraction"),
    ("sara", dict(lambda_rank=-1.0), "lambda_rank"), ("sara", dict(progressive_at=1.0), "progressive_at"),
    ("spiel", dict(density=0.0), "density"), ("spiel", dict(density=2.0), "density"),
    ("spiel", dict(reselection_steps=0), "reselection_steps"),
    ("spiel", dict(reselection_steps=4, selection_accumulation_steps=5), "selection_accumulation_steps"),
    ("spiel", dict(initial_reselection_rate=0.0), "initial_reselection_rate"),
    ("s2ft", dict(ratio=0.0), "ratio"), ("s2ft", dict(ratio=1.01), "ratio"), ("s2ft", dict(head_dim=0), "head_dim"),
    ("s2ft", dict(row_modules="query"), "row_modules"),
    ("paca", dict(r=0), "r"), ("paca", dict(r=2.5), "r"),
    ("nola", dict(num_basis_A=0), "num_basis_A"), ("nola", dict(num_basis_B=-3), "num_basis_B"),
    ("nola", dict(r=0), "r"),
])
def test_invalid_configs_fail_at_config_time_naming_the_field(method, fields, field):
    msg = error(make_config, method, **fields)
    assert msg.startswith(f"{field}:"), msg


def test_unknown_key_suggests_the_field():
    assert "fraction" in error(make_config, "sara", fractoin=0.1)


@pytest.mark.parametrize("method, model_name, fields, words", [
    ("paca", "bert", dict(r=40, target_modules=["query"]), ["r:", "40", "32"]),
    ("s2ft", "bert", dict(head_dim=5, target_modules=["attention.output.dense"]), ["head_dim", "5", "32"]),
    ("sara", "bert", dict(target_modules=["word_embeddings"]), ["sara", "Embedding"]),
    ("spiel", "cnn", dict(target_modules=["conv1"]), ["spiel", "Conv2d"]),
    ("s2ft", "cnn", dict(target_modules=["conv1"]), ["s2ft", "Conv2d"]),
    ("paca", "bert", dict(target_modules=["word_embeddings"]), ["paca", "Embedding"]),
    ("nola", "cnn", dict(target_modules=["conv2"]), ["nola", "Conv2d"]),
])
def test_invalid_configs_fail_at_adapt_time_before_touching_the_model(tiny, method, model_name, fields, words):
    model = tiny[model_name].build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    msg = error(splice.adapt, model, make_config(method, **fields))
    for w in words:
        assert w in msg, msg
    assert splice.active_adapters(model) == []
    assert all(p.requires_grad and torch.equal(p, before[n]) for n, p in model.named_parameters())
