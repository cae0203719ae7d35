"""Memory-efficient training strategies (GaLore, LISA, HFT, ReLoRA): each one's defining property on a tiny model,
through the one training loop, and invalid configs failing at config time with one clear line."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

import splice
from splice.adapters.model import configs
from splice.errors import SpliceError
from splice.train.loop import TrainConfig, train_loop
from splice.train.optim import (GaLoreAdamW, HftConfig, LisaConfig, ReloraConfig, build_strategy,
                                strategy_names)
from splice.train.optim.galore import state_floats
from splice.train.optim.relora import magnitude_prune_


def bert(layers: int = 2, hidden: int = 32, seed: int = 0) -> BertModel:
    cfg = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=32, initializer_range=0.1,
                     attn_implementation="eager")
    torch.manual_seed(seed)
    return BertModel(cfg).eval()


def data(steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (4, 6), generator=g) for _ in range(steps)]


def loss_of(model: nn.Module):
    def loss(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids)
        return out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()  # every part gets a gradient
    return loss


class Spy:
    """A loop hook: after each optimizer step (gradients still there), which parameters got a gradient."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.steps: list[set[str]] = []

    def after_step(self, step: int) -> None:
        self.steps.append({n for n, p in self.model.named_parameters() if p.grad is not None})


def train(model: nn.Module, config: TrainConfig, params=None, hooks=()) -> object:
    params = list(model.parameters()) if params is None else params
    steps = config.max_steps
    return train_loop(params, lambda e: data(steps), loss_of(model), config, steps, modules=[model], hooks=hooks,
                      progress=False)


def full(model: nn.Module) -> nn.Module:
    return model.requires_grad_(True)


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("encoder.layer.") else None


def test_an_empty_training_set_is_an_error_not_an_endless_loop():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(SpliceError, match="no training batches: the training set is empty"):
        train_loop([p], lambda epoch: [], lambda batch: p.sum(), TrainConfig(epochs=1), 0, progress=False)


def test_every_strategy_is_registered():
    assert {"galore", "lisa", "hft", "relora"} <= set(strategy_names())


# -- GaLore ----------------------------------------------------------------------------------------------------------
def test_galore_state_has_the_projected_shape_and_the_formula_size():
    model = full(bert())
    config = TrainConfig(max_steps=1, lr=1e-3, strategy="galore", strategy_options={"rank": 4})
    strategy = build_strategy(config.strategy_config(), list(model.parameters()), [model], 1)
    opt = strategy.optimizer(list(model.parameters()), 1e-3, 0.0)
    loss_of(model)(data(1)[0]).backward()
    opt.step()
    r = 4
    named = dict(model.named_parameters())
    q = named["encoder.layer.0.attention.self.query.weight"]  # (32, 32): m ≥ n, projected on the right
    up = named["encoder.layer.0.intermediate.dense.weight"]  # (64, 32): m ≥ n
    down = named["encoder.layer.0.output.dense.weight"]  # (32, 64): m < n, projected on the left
    assert opt.state[q]["exp_avg"].shape == (32, r) and opt.state[q]["projector"].shape == (32, r)
    assert opt.state[up]["exp_avg"].shape == (64, r) and opt.state[up]["exp_avg_sq"].shape == (64, r)
    assert opt.state[down]["exp_avg"].shape == (r, 64) and opt.state[down]["projector"].shape == (32, r)
    # outside the layers (embeddings) and 1-D parameters: plain AdamW, full-shape moments
    emb = named["embeddings.word_embeddings.weight"]
    assert opt.state[emb]["exp_avg"].shape == emb.shape
    assert "projector" not in opt.state[named["encoder.layer.0.output.dense.bias"]]
    # the state's size is what the formula says: r(2·max + min) per projected matrix, 2·numel for the rest
    held = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert held == strategy.summary()["state_floats"]
    for p in (q, up, down):
        assert sum(opt.state[p][k].numel() for k in ("exp_avg", "exp_avg_sq", "projector")) == \
            state_floats(p.shape, r) == r * (2 * max(p.shape) + min(p.shape))
    assert strategy.summary()["projected_matrices"] == 12  # 6 matrices in each of 2 layers
    assert train(model, config).strategy == strategy.summary()  # the loop reports the same


def test_galore_update_lies_in_the_gradient_subspace_and_the_projection_refreshes_every_gap():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(24, 16))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 2, "scale": 0.5}], lr=0.1, weight_decay=0.0)
    projectors = []
    for step in range(5):
        before = w.detach().clone()
        w.grad = torch.randn(24, 16)
        opt.step()
        Q = opt.state[w]["projector"]  # (16, 3): the update is (m, r) · Qᵀ
        change = w.detach() - before
        torch.testing.assert_close(change - change @ Q @ Q.t(), torch.zeros_like(change), atol=1e-6, rtol=0)
        projectors.append(Q.clone())
    assert torch.equal(projectors[0], projectors[1]) and not torch.equal(projectors[1], projectors[2])
    assert torch.equal(projectors[2], projectors[3]) and not torch.equal(projectors[3], projectors[4])



@pytest.mark.parametrize("shape", [(24, 16), (10, 30)])  # tall: right singular vectors; wide: left ones
def test_galore_follows_the_papers_algorithm_with_the_gradients_top_singular_subspace(shape):
    """Algorithm 2 of the paper written out plainly: at every refresh the projector spans the top-r singular
    subspace of that step's gradient (checked as a subspace, signs being arbitrary), Adam runs on the projected
    gradient with its moments carried across refreshes, and the step is −η α (projected back) − η λ W."""
    torch.manual_seed(0)
    rank, gap, lr, alpha, wd, eps, (b1, b2) = 3, 2, 0.05, 0.5, 0.1, 1e-8, (0.9, 0.999)
    w = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    ref = w.detach().clone()
    opt = GaLoreAdamW([{"params": [w], "rank": rank, "update_proj_gap": gap, "scale": alpha}], lr=lr,
                      weight_decay=wd, eps=eps)
    tall = shape[0] >= shape[1]
    m = v = None
    for t in range(1, 6):
        g = torch.randn(*shape, dtype=torch.float64)
        w.grad = g.clone()
        opt.step()
        if (t - 1) % gap == 0:
            U, _, Vh = torch.linalg.svd(g, full_matrices=False)
            basis = Vh[:rank].t() if tall else U[:, :rank]
            got = opt.state[w]["projector"]
            # the SVD runs in float32 whatever the weight's dtype: the subspace agrees to float32 precision
            torch.testing.assert_close(got @ got.t(), basis @ basis.t(), atol=1e-5, rtol=0)
            proj = got.clone()  # its basis (signs included) is what the moments are kept in
        r = g @ proj if tall else proj.t() @ g
        m = (1 - b1) * r if m is None else b1 * m + (1 - b1) * r
        v = (1 - b2) * r * r if v is None else b2 * v + (1 - b2) * r * r
        n = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        ref = ref * (1 - lr * wd) - lr * alpha * (n @ proj.t() if tall else proj @ n)
        torch.testing.assert_close(w.detach(), ref, atol=1e-10, rtol=0)

def test_galore_unprojected_parameters_step_exactly_like_torch_adamw():
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(5, 7)), nn.Parameter(torch.randn(7))]
    b = [nn.Parameter(t.detach().clone()) for t in a]
    ours = GaLoreAdamW(a, lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW(b, lr=0.01, weight_decay=0.1, foreach=False)
    for _ in range(4):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_galore_refuses_a_rank_no_matrix_can_take():
    model = full(bert())
    config = TrainConfig(max_steps=1, strategy="galore", strategy_options={"rank": 32})
    with pytest.raises(SpliceError, match="galore: no trained weight matrix .* larger than rank=32"):
        train(model, config)


# -- LISA ------------------------------------------------------------------------------------------------------------
def test_lisa_trains_exactly_gamma_layers_plus_the_parts_outside_the_layers():
    model = full(bert(layers=4))
    spy = Spy(model)
    config = TrainConfig(max_steps=9, lr=1e-3, strategy=LisaConfig(layers=2, interval=3))
    result = train(model, config, hooks=[spy])
    outside = {n for n, _ in model.named_parameters() if layer_of(n) is None}
    sets = []
    for got in spy.steps:
        layers = {layer_of(n) for n in got} - {None}
        assert len(layers) == 2  # γ layers ...
        assert outside <= got  # ... plus embeddings and pooler, always
        assert got == outside | {n for n, _ in model.named_parameters() if layer_of(n) in layers}
        sets.append(layers)
    # resampled exactly at steps 0, 3, 6: constant within a period, and the draws differ
    assert sets[0] == sets[1] == sets[2] and sets[3] == sets[4] == sets[5] and sets[6] == sets[7] == sets[8]
    assert len({frozenset(s) for s in sets}) > 1
    assert result.strategy["resamplings"] == 3
    assert all(p.requires_grad for p in model.parameters())  # the loop restores the model when it ends


def test_lisa_drops_the_optimizer_state_of_frozen_layers():
    model = full(bert(layers=3))
    params = list(model.parameters())
    strategy = build_strategy(LisaConfig(layers=1, interval=1), params, [model], 4)
    opt = torch.optim.AdamW(params, lr=1e-3)
    for step in range(4):
        strategy.before_step(step, opt)
        loss_of(model)(data(1)[0]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        active = strategy.active
        for n, p in model.named_parameters():
            layer = layer_of(n)
            assert (p in opt.state) == (layer is None or layer in active), n
    strategy.close()


def test_lisa_counts_the_memory_the_mechanism_implies():
    model = full(bert(layers=4))
    result = train(model, TrainConfig(max_steps=1, strategy="lisa", strategy_options={"layers": 1}))
    per_layer = sum(p.numel() for p in model.encoder.layer[0].parameters())
    outside = sum(p.numel() for n, p in model.named_parameters() if layer_of(n) is None)
    assert result.strategy["trained_params"] == outside + per_layer
    assert result.strategy["state_floats"] == 2 * (outside + per_layer)


# -- HFT -------------------------------------------------------------------------------------------------------------
def test_hft_trains_half_of_each_category_per_layer_and_redraws_each_round():
    model = full(bert(layers=2))
    spy = Spy(model)
    result = train(model, TrainConfig(max_steps=6, lr=1e-3, strategy=HftConfig(interval=2)), hooks=[spy])
    modules = lambda got, i: {n.rsplit(".", 1)[0] for n in got if layer_of(n) == i}  # noqa: E731
    rounds = []
    for got in spy.steps:
        for i in range(2):
            units = {m.split(".", 3)[3] for m in modules(got, i)}
            attention = units & {"attention.self.query", "attention.self.key", "attention.self.value",
                                 "attention.output.dense"}
            ffn = units & {"intermediate.dense", "output.dense"}
            norms = units & {"attention.output.LayerNorm", "output.LayerNorm"}
            assert (len(attention), len(ffn), len(norms)) == (2, 1, 1), units
        rounds.append(frozenset(got))
    assert rounds[0] == rounds[1] and rounds[2] == rounds[3] and rounds[4] == rounds[5]
    assert len(set(rounds)) > 1
    assert result.strategy["rounds"] == 3
    for got in spy.steps:  # a weight and its bias train together (the unit is the module)
        inside = [n for n in got if layer_of(n) is not None]
        assert {n[:-7] for n in inside if n.endswith(".weight")} == {n[:-5] for n in inside if n.endswith(".bias")}


def test_hft_selects_once_per_run_by_default():
    model = full(bert(layers=2))
    spy = Spy(model)
    result = train(model, TrainConfig(max_steps=4, lr=1e-3, strategy="hft"), hooks=[spy])
    assert len({frozenset(s) for s in spy.steps}) == 1 and result.strategy["rounds"] == 1


def test_hft_halves_lora_adapters_by_layer():
    model = bert(layers=2)
    splice.adapt(model, splice.LoraConfig(r=2, target_modules="all-linear"))
    spy = Spy(model)
    train(model, TrainConfig(max_steps=2, strategy="hft"), params=splice.trainable_parameters(model), hooks=[spy])
    for got in spy.steps:
        for i in range(2):
            trained = {n.split(".adapters")[0].split(".", 3)[3] for n in got if layer_of(n) == i}
            assert len(trained & {"attention.self.query", "attention.self.key", "attention.self.value",
                                  "attention.output.dense"}) == 2
            assert len(trained & {"intermediate.dense", "output.dense"}) == 1


# -- ReLoRA ----------------------------------------------------------------------------------------------------------
def relora_model():
    model = bert()
    splice.adapt(model, splice.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)  # a non-zero update to merge
    return model


def test_relora_restart_merges_into_the_base_keeps_the_output_and_reinitialises_the_factors():
    model = relora_model()
    ids = data(1)[0]
    params = splice.trainable_parameters(model)
    strategy = build_strategy(ReloraConfig(interval=2, warmup=1), params, [model], 10)
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss_of(model)(ids).backward()
    opt.step()
    layer = model.encoder.layer[0].attention.self.query
    adapter = layer.adapters["default"]
    w0 = layer.base.weight.detach().clone()
    expected = w0 + adapter.scale * adapter.lora_B.detach() @ adapter.lora_A.detach()
    old_a = adapter.lora_A.detach().clone()
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    strategy.restart(opt)
    with torch.no_grad():
        after = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)  # the restart itself changes nothing
    torch.testing.assert_close(layer.base.weight.detach(), expected, atol=1e-6, rtol=0)  # the merged update
    assert torch.count_nonzero(adapter.lora_B) == 0  # B = 0
    assert not torch.equal(adapter.lora_A, old_a)  # A re-drawn, Kaiming-uniform(a=√5): |A| ≤ 1/√in
    assert adapter.lora_A.abs().max() <= 1 / math.sqrt(adapter.lora_A.shape[1])
    for p in (adapter.lora_A, adapter.lora_B):
        for key in ("exp_avg", "exp_avg_sq"):  # 99% of the moments pruned by magnitude
            assert torch.count_nonzero(opt.state[p][key]) <= round(0.01 * p.numel())


def test_relora_folds_every_cycle_into_one_adapter_of_the_original_base(tmp_path):
    model = relora_model()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}
    ids = data(1)[0]
    params = splice.trainable_parameters(model)
    strategy = build_strategy(ReloraConfig(interval=2, warmup=1), params, [model], 10)
    for _ in range(2):
        strategy.restart(None)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.3)  # a cycle of "training"
    with torch.no_grad():
        trained = model(input_ids=ids).last_hidden_state
    strategy.close()
    for n, p in model.named_parameters():  # the base is the original again
        if "lora" not in n:
            torch.testing.assert_close(p.detach(), base_weights[n], atol=1e-6, rtol=0)
    assert configs(model)["default"].r == 6 and configs(model)["default"].lora_alpha == 12  # 3 cycles, same s
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, trained, atol=1e-5, rtol=1e-5)
    splice.save_adapter(model, tmp_path / "a")
    fresh = splice.load_adapter(bert(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).last_hidden_state, trained, atol=1e-5, rtol=1e-5)


def test_relora_sum_past_full_rank_is_stored_exactly_at_full_rank(tmp_path):
    model = bert()
    splice.adapt(model, splice.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "intermediate.dense"]))
    ids = data(1)[0]
    params = splice.trainable_parameters(model)
    strategy = build_strategy(ReloraConfig(interval=2, warmup=1), params, [model], 100)
    for _ in range(9):  # 10 cycles of rank 4: 40 > 32 = min(out, in) of both matrices
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.2)
        strategy.restart(None)
    with torch.no_grad():
        trained = model(input_ids=ids).last_hidden_state
    strategy.close()
    assert configs(model)["default"].r == 32 and configs(model)["default"].lora_alpha == 64
    assert model.encoder.layer[0].intermediate.dense.adapters["default"].lora_A.shape == (32, 32)
    splice.save_adapter(model, tmp_path / "a")
    fresh = splice.load_adapter(bert(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, trained, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fresh(input_ids=ids).last_hidden_state, trained, atol=1e-5, rtol=1e-5)


def test_relora_in_the_loop_restarts_on_schedule_with_a_jagged_warmup():
    model = relora_model()
    params = splice.trainable_parameters(model)
    config = TrainConfig(max_steps=7, lr=1e-2, warmup_ratio=0.0, strategy="relora",
                         strategy_options={"interval": 3, "warmup": 2})
    strategy = build_strategy(config.strategy_config(), params, [model], 7)
    assert list(strategy.restart_steps()) == [3, 6]
    assert [strategy.lr_factor(s) for s in range(7)] == pytest.approx([1, 1, 1, 1 / 3, 2 / 3, 1, 1 / 3])
    result = train(model, config, params=params)
    assert result.strategy["restarts"] == 2
    assert configs(model)["default"].r == 6


def test_relora_needs_a_lora_adapter():
    model = full(bert())
    with pytest.raises(SpliceError, match="relora: needs a trained LoRA adapter"):
        train(model, TrainConfig(max_steps=1, strategy="relora"))


def test_magnitude_pruning_keeps_the_largest_entries():
    t = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.05, 1.0, -0.4, 0.6, 0.7])
    magnitude_prune_(t, 0.8)
    assert t.tolist() == [0, -5.0, 0, 2.0, 0, 0, 0, 0, 0, 0]


# -- configs ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,options,message", [
    ("galore", {"rank": 0}, "galore rank: must be a positive integer, got 0"),
    ("galore", {"update_proj_gap": 0}, "galore update_proj_gap: must be a positive integer"),
    ("galore", {"scale": -1.0}, "galore scale: must be positive"),
    ("galore", {"rnak": 4}, "unknown config key 'rnak' for strategy 'galore'.*rank"),
    ("lisa", {"layers": 0}, "lisa layers: must be a positive integer"),
    ("lisa", {"interval": 0}, "lisa interval: must be a positive integer"),
    ("hft", {"fraction": 1.0}, r"hft fraction: must be in \(0, 1\)"),
    ("hft", {"interval": -1}, "hft interval: must be a non-negative integer"),
    ("relora", {"interval": 0}, "relora interval: must be a positive integer"),
    ("relora", {"interval": 5, "warmup": 5}, r"relora warmup: must be an integer in \[0, interval=5\)"),
    ("relora", {"prune": 1.5}, r"relora prune: must be in \[0, 1\]"),
    ("galor", {}, "unknown training strategy 'galor'.*galore"),
])
def test_invalid_strategy_configs_fail_at_config_time_with_one_line(strategy, options, message):
    with pytest.raises(SpliceError, match=message) as err:
        TrainConfig(strategy=strategy, strategy_options=options)
    assert "\n" not in str(err.value)


def test_options_without_a_strategy_and_layer_checks_at_build_time_are_one_line():
    with pytest.raises(SpliceError, match="strategy_options: given without a strategy"):
        TrainConfig(strategy_options={"rank": 4})
    model = full(bert(layers=2))
    with pytest.raises(SpliceError, match="lisa layers: 3 is more than the 2 layers"):
        train(model, TrainConfig(max_steps=1, strategy="lisa", strategy_options={"layers": 3}))
    flat = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(SpliceError, match="hft: found no list of repeated layers .* in Sequential"):
        build_strategy(HftConfig(), list(flat.parameters()), [flat], 1)


def test_a_config_object_is_the_same_as_name_and_options():
    a = splice.TrainConfig(strategy=splice.GaloreConfig(rank=2))  # the top-level API
    assert a.strategy == "galore" and a.strategy_options["rank"] == 2
    assert a.strategy_config() == TrainConfig(strategy="galore", strategy_options={"rank": 2}).strategy_config()
