"""The decomposition-based adapters (SVFit, SORSA, SVFT, LoLDU, LoRA-SB): each method's defining property on a
constructed case. Save/load, merge, mixed batches and the rest are the contract matrix's (test_contract.py).

Tolerances (fp32): 1e-5 absolute where the same weights run through another code path; exact equality where the
computation is the same.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import splice
from splice.adapters import make_config
from splice.adapters.inject import adapter_layers
from splice.adapters.svd_common import svd
from splice.adapters.svft import band

# the trained numbers per wrapped (in → out) module, as each config's params_formula states it
FORMULAS = {
    "svfit": (dict(r=4), lambda i, o: 4),
    "sorsa": (dict(r=4), lambda i, o: 4 * (i + o + 1)),
    "svft": (dict(), lambda i, o: min(i, o)),  # plain over all singular vectors
    "svft-banded": (dict(pattern="banded", off_diag=3), lambda i, o: min(i, o) * 7 - 3 * 4),
    "svft-random": (dict(pattern="random", off_diag=2, rank=10), lambda i, o: 10 * 5 - 2 * 3),
    "loldu": (dict(r=4), lambda i, o: 4 + 1),
    "lora_sb": (dict(r=4, init_weights="svd"), lambda i, o: 4 * 4),
}


def adapted(model: nn.Module, key: str, **extra) -> nn.Module:
    fields, _ = FORMULAS[key]
    return splice.adapt(model, make_config(key.split("-")[0], target_modules="all-linear", **fields), **extra)


def bert_output(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def classify_loss(model: nn.Module):
    """A loss for a bare encoder (no labels head): the calibration batches are token ids."""
    return lambda ids: model(input_ids=ids).last_hidden_state[:, 0].square().mean()


def calibration_ids(batches: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 100, (4, 6), generator=g) for _ in range(batches)]


@pytest.mark.parametrize("key", list(FORMULAS))
def test_trainable_count_matches_params_formula(bert, key):
    model = adapted(bert, key)
    layers = adapter_layers(model)
    assert len(layers) == 13  # 12 encoder linears + the pooler
    expected = sum(FORMULAS[key][1](layer.base.in_features, layer.base.out_features) for _, layer in layers)
    assert sum(p.numel() for p in splice.trainable_parameters(model)) == expected
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in splice.trainable_parameters(model)}


@pytest.mark.parametrize("key", list(FORMULAS))
def test_model_equals_the_base_at_init(tiny, key):
    base_out = bert_output(tiny["bert"].build())
    model = adapted(tiny["bert"].build(), key)
    assert torch.equal(bert_output(model), base_out)  # every start is subtracted exactly in the forward
    for d in splice.get_delta(model).values():  # SORSA's rank-2r delta sums ± equal products: float rounding
        assert d.materialize().abs().max() <= (1e-6 if key == "sorsa" else 0)


def test_lora_sb_gradient_start_keeps_the_base_at_init(tiny):
    base_out = bert_output(tiny["bert"].build())
    model = tiny["bert"].build()
    # the encoder's linears (the pooler is outside this loss: a zero gradient keeps the data-free start)
    splice.adapt(model, splice.LoraSBConfig(r=4, target_modules=r".*encoder.*(query|key|value|dense)"),
                 calibration=calibration_ids(), calibration_loss=classify_loss(model))
    adapters = [layer.adapters["default"] for _, layer in adapter_layers(model)]
    assert {a.init for a in adapters} == {"gradient"} and all(a.lora_sb_R0.abs().max() > 0 for a in adapters)
    torch.testing.assert_close(bert_output(model), base_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, diagonal", [("svfit", {"svfit_delta"}), ("loldu", {"loldu_z", "loldu_scale"})])
def test_svfit_and_loldu_train_only_their_diagonal(bert, method, diagonal):
    model = splice.adapt(bert, make_config(method, r=4, target_modules=["query", "intermediate.dense"]))
    model.train()
    model(input_ids=torch.randint(3, 100, (2, 6))).last_hidden_state.square().sum().backward()
    for _, layer in adapter_layers(model):
        adapter = layer.adapters["default"]
        trained = {n for n, p in adapter.named_parameters() if p.requires_grad}
        assert trained == diagonal
        assert adapter.get_parameter(sorted(diagonal)[-1 if method == "svfit" else 1]).shape == (4,)  # r numbers
        assert all(not b.requires_grad for b in adapter.buffers())  # the singular / LU factors are frozen
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in adapter.parameters())
    assert all(p.grad is None for p in bert.parameters() if not any(p is q for q in
                                                                    splice.trainable_parameters(model)))


def test_svfit_update_scales_the_top_singular_directions(bert):
    weight = bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    model = splice.adapt(bert, splice.SVFitConfig(r=3, target_modules=["layer.0.attention.self.query"]))
    adapter = adapter_layers(model)[0][1].adapters["default"]
    with torch.no_grad():
        adapter.svfit_delta.copy_(torch.tensor([0.5, -0.25, 1.0]))
    U, S, Vh = svd(weight)
    delta = splice.get_delta(model)["encoder.layer.0.attention.self.query.weight"].materialize()
    torch.testing.assert_close(delta, U[:, :3] @ torch.diag(torch.tensor([0.5, -0.25, 1.0])) @ Vh[:3],
                               atol=1e-5, rtol=0)
    # the merged weight has exactly those singular values moved, the rest of the spectrum untouched
    merged = torch.linalg.svdvals(weight + delta)
    expected = torch.cat([S[:3] + torch.tensor([0.5, -0.25, 1.0]), S[3:]]).sort(descending=True).values
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)


def test_sorsa_regulariser_is_zero_at_init_and_positive_once_u_p_moves(bert):
    config = splice.SorsaConfig(r=4, gamma=0.5, target_modules=["query", "value"])
    model = splice.adapt(bert, config)
    hook = config.training_hook(model, "default", total_steps=10)
    assert len(hook.adapters) == 4
    assert hook.loss().item() <= 1e-10
    adapter = hook.adapters[0]
    with torch.no_grad():
        adapter.sorsa_B.add_(0.1 * torch.randn_like(adapter.sorsa_B))  # U_p off the Stiefel manifold
    eye = torch.eye(4)
    expected = 0.5 * (((adapter.sorsa_B.t() @ adapter.sorsa_B - eye).square().sum()
                       + (adapter.sorsa_A @ adapter.sorsa_A.t() - eye).square().sum()) / 4)
    loss = hook.loss()
    assert loss.item() > 1e-4
    torch.testing.assert_close(loss, expected, atol=1e-7, rtol=1e-5)
    loss.backward()  # its gradient reaches U_p, the parameter that moved, and pulls it back
    assert adapter.sorsa_B.grad.abs().max() > 0


def test_sorsa_delta_is_the_change_of_the_principal_part(bert):
    model = splice.adapt(bert, splice.SorsaConfig(r=4, target_modules=["layer.1.output.dense"]))
    adapter = adapter_layers(model)[0][1].adapters["default"]
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    delta = splice.get_delta(model)["encoder.layer.1.output.dense.weight"]
    assert delta.rank == 8  # 2r: [U_p S_p, −U_p⁰ S_p⁰] · [V_pᵀ; V_p⁰ᵀ]
    principal = lambda B, S, A: B @ torch.diag(S) @ A  # noqa: E731
    torch.testing.assert_close(delta.materialize(), principal(adapter.sorsa_B, adapter.sorsa_S, adapter.sorsa_A)
                               - principal(adapter.sorsa_B0, adapter.sorsa_S0, adapter.sorsa_A0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fields, n, count", [
    (dict(), 32, 32),  # plain: the diagonal
    (dict(pattern="banded", off_diag=2), 32, 32 * 5 - 2 * 3),
    (dict(pattern="random", k=50, random_seed=1), 32, 50),
    (dict(pattern="top_k", k=20, rank=12), 12, 20),
])
def test_svft_trains_exactly_the_pattern_and_m_stays_zero_elsewhere(bert, fields, n, count):
    model = splice.adapt(bert, splice.SVFTConfig(target_modules=["layer.0.attention.self.query"], **fields))
    adapter = adapter_layers(model)[0][1].adapters["default"]
    rows, cols = adapter.svft_indices
    assert adapter.svft_values.shape == (count,) and len(set(zip(rows.tolist(), cols.tolist()))) == count
    assert [p for p in adapter.parameters()] == [adapter.svft_values]
    if not fields:
        assert torch.equal(rows, torch.arange(n)) and torch.equal(cols, torch.arange(n))
    opt = torch.optim.AdamW(splice.trainable_parameters(model), lr=0.1, weight_decay=0.1)
    model.train()
    model(input_ids=torch.randint(3, 100, (2, 6))).last_hidden_state.square().sum().backward()
    opt.step()
    M = adapter.matrix().detach()
    on = torch.zeros(n, n, dtype=torch.bool)
    on[rows, cols] = True
    assert M.shape == (n, n) and (M[~on] == 0).all() and (M[on] != 0).all()
    torch.testing.assert_close(adapter.update(), adapter.svft_U @ M @ adapter.svft_Vh)


def test_svft_banded_and_top_k_patterns_follow_the_paper():
    assert band(5, 1).t().tolist() == [[i, j] for i in range(5) for j in range(5) if abs(i - j) <= 1]
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(8, 8))
    splice.adapt(layer, splice.SVFTConfig(pattern="top_k", k=5, target_modules=["0"]))
    adapter = layer[0].adapters["default"]
    U, _, Vh = svd(layer[0].base.weight.detach())
    scores = (U.t() @ Vh.t()).abs()  # |u_iᵀ v_j|
    chosen = scores[adapter.svft_indices[0], adapter.svft_indices[1]]
    assert chosen.min() >= scores.flatten().topk(5).values.min()


@pytest.mark.parametrize("fields, form", [(dict(), "Dense"), (dict(pattern="banded", off_diag=1, rank=4), "LowRank"),
                                          (dict(pattern="random", k=6, rank=20), "LowRank")])
def test_svft_delta_takes_the_smaller_exact_form(gpt2, fields, form):
    model = splice.adapt(gpt2, splice.SVFTConfig(target_modules=["h.0.mlp.c_fc"], **fields))  # Conv1D 32 → 128
    adapter = adapter_layers(model)[0][1].adapters["default"]
    with torch.no_grad():
        adapter.svft_values.normal_()
    delta = splice.get_delta(model)["transformer.h.0.mlp.c_fc.weight"]
    assert type(delta).__name__ == form and delta.numel_stored <= 32 * 128
    torch.testing.assert_close(delta.materialize(), adapter.update().detach().t(), atol=1e-5, rtol=0)


def test_loldu_factors_come_from_the_ldu_decomposition(bert):
    weight = bert.pooler.dense.weight.detach().clone()
    model = splice.adapt(bert, splice.LoLDUConfig(r=32, lora_alpha=2.0, target_modules=["pooler.dense"]))
    adapter = adapter_layers(model)[0][1].adapters["default"]
    # full rank: σ₀ L diag(z₀) U rebuilds the weight, L unit lower (up to the pivoting), U unit upper
    rebuilt = adapter.loldu_L @ torch.diag(adapter.loldu_z.detach()) @ adapter.loldu_U
    torch.testing.assert_close(rebuilt, weight, atol=1e-5, rtol=0)
    assert torch.equal(torch.diagonal(adapter.loldu_U), torch.ones(32))
    assert adapter.loldu_scale.item() == pytest.approx(2.0 / 32)
    with torch.no_grad():
        adapter.loldu_scale.mul_(3)  # σ = 3σ₀: the update is 2σ₀ times the whole LDU part
    delta = splice.get_delta(model)["pooler.dense.weight"].materialize()
    torch.testing.assert_close(delta, 2 * (2.0 / 32) * weight, atol=1e-5, rtol=0)


def linear_case(r: int = 2):
    """One linear layer and two calibration batches with a known mean gradient ∂L/∂W."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    batches = [torch.randn(8, 6, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    loss = lambda x: (model(x) - 1.0).square().mean()  # noqa: E731
    W = model[0].weight.detach().clone().requires_grad_(True)
    grads = [torch.autograd.grad((nn.functional.linear(x, W, model[0].bias) - 1.0).square().mean(), W)[0]
             for x in batches]
    return model, batches, loss, torch.stack(grads).mean(0)


@pytest.mark.parametrize("update, step", [("adam", torch.sign), ("sgd", lambda g: g)])
def test_lora_sb_start_is_the_best_rank_r_approximation_of_the_first_step(update, step):
    model, batches, loss, grad = linear_case()
    config = splice.LoraSBConfig(r=2, update=update, init_lr=0.01, target_modules=["0"])
    splice.adapt(model, config, calibration=batches, calibration_loss=loss)
    adapter = model[0].adapters["default"]
    first = -0.01 * step(grad)
    U, S, Vh = torch.linalg.svd(first)
    best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]  # Eckart–Young
    torch.testing.assert_close(adapter.lora_sb_B @ adapter.lora_sb_R @ adapter.lora_sb_A, best, atol=1e-6, rtol=0)
    eye = torch.eye(2)  # B and A orthonormal, R₀ diagonal
    torch.testing.assert_close(adapter.lora_sb_B.t() @ adapter.lora_sb_B, eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(adapter.lora_sb_A @ adapter.lora_sb_A.t(), eye, atol=1e-6, rtol=0)
    assert adapter.init == "gradient"
    assert [p.shape for p in splice.trainable_parameters(model)] == [(2, 2)]


def test_lora_sb_falls_back_to_the_weight_svd_without_batches():
    model, *_ = linear_case()
    weight = model[0].weight.detach().clone()
    splice.adapt(model, splice.LoraSBConfig(r=2, target_modules=["0"]))
    adapter = model[0].adapters["default"]
    U, _, Vh = svd(weight)
    assert adapter.init == "svd" and adapter.lora_sb_R0.abs().max() == 0
    torch.testing.assert_close(adapter.lora_sb_B, U[:, :2])
    torch.testing.assert_close(adapter.lora_sb_A, Vh[:2])


def test_lora_sb_calibration_errors_are_one_line():
    model, batches, loss, _ = linear_case()
    with pytest.raises(splice.SpliceError, match="^init_weights: gradient is data-driven; pass calibration"):
        splice.adapt(model, splice.LoraSBConfig(r=2, init_weights="gradient", target_modules=["0"]))
    with pytest.raises(splice.SpliceError, match="^calibration data given, but init_weights='svd' does not use it"):
        splice.adapt(model, splice.LoraSBConfig(r=2, init_weights="svd", target_modules=["0"]),
                     calibration=batches, calibration_loss=loss)
    with pytest.raises(splice.SpliceError, match="^calibration data given, but method 'svfit' does not use it"):
        splice.adapt(model, splice.SVFitConfig(r=2, target_modules=["0"]), calibration=batches)
    assert not splice.active_adapters(model)  # refused before anything was wrapped


def test_needs_calibration_tells_splice_train_which_configs_get_batches():
    assert splice.LoraSBConfig().needs_calibration and splice.LoraSBConfig(init_weights="gradient").needs_calibration
    assert not splice.LoraSBConfig(init_weights="svd").needs_calibration
    assert splice.LoraConfig(init_lora_weights="lora_ga").needs_calibration
    assert not splice.LoraConfig().needs_calibration and not splice.SVFTConfig().needs_calibration


@pytest.mark.parametrize("method, fields", [
    ("svfit", dict(r=33)), ("sorsa", dict(r=40)), ("loldu", dict(r=33)), ("lora_sb", dict(r=64)),
    ("svft", dict(rank=33)),
])
def test_rank_larger_than_the_layer_fails_at_adapt_time(bert, method, fields):
    with pytest.raises(splice.SpliceError) as info:
        splice.adapt(bert, make_config(method, target_modules=["query"], **fields))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{next(iter(fields))}: rank") and "32 → 32" in msg
    assert not splice.active_adapters(bert) and all(p.requires_grad for p in bert.parameters())


@pytest.mark.parametrize("method, fields, start", [
    ("svft", dict(pattern="diagonal"), "pattern: must be one of plain, banded, random, top_k"),
    ("svft", dict(off_diag=-1), "off_diag: must be an integer ≥ 0"),
    ("svft", dict(pattern="plain", k=8), "k: sets the size of the random and top_k patterns"),
    ("svft", dict(pattern="random", k=0), "k: must be a positive integer"),
    ("svft", dict(rank=0), "rank: must be a positive integer"),
    ("svfit", dict(r=0), "r: must be a positive integer"),
    ("sorsa", dict(gamma=-1.0), "gamma: must be a number ≥ 0"),
    ("loldu", dict(lora_alpha=0), "lora_alpha: must be a non-zero number"),
    ("lora_sb", dict(init_weights="pissa"), "init_weights: must be one of auto, gradient, svd"),
    ("lora_sb", dict(update="adamw"), "update: must be one of adam, sgd"),
    ("lora_sb", dict(init_lr=0), "init_lr: must be a positive number"),
    ("svfit", dict(rank=4), "unknown config key 'rank' for method 'svfit'"),
])
def test_invalid_configs_fail_at_config_time_with_one_line(method, fields, start):
    with pytest.raises(splice.SpliceError) as info:
        make_config(method, **fields)
    assert str(info.value).startswith(start) and "\n" not in str(info.value)


def test_svft_pattern_errors_at_adapt_time(llama):
    with pytest.raises(splice.SpliceError, match="^pattern: top_k aligns left and right singular vectors, which "
                                                 "needs a square weight; layer 32 → 16 is not"):
        splice.adapt(llama, splice.SVFTConfig(pattern="top_k", target_modules=["k_proj"]))
    with pytest.raises(splice.SpliceError, match=r"^k: 2000 entries do not fit the 32×32 matrix M"):
        splice.adapt(llama, splice.SVFTConfig(pattern="random", k=2000, target_modules=["q_proj"]))


@pytest.mark.parametrize("method", ["svfit", "sorsa", "svft", "loldu", "lora_sb"])
def test_other_module_kinds_are_refused_with_one_line(bert, method):
    with pytest.raises(splice.SpliceError, match=f"^{method} cannot wrap Embedding; it wraps nn.Linear and HF Conv1D"):
        splice.adapt(bert, make_config(method, target_modules=["word_embeddings"]))


@pytest.mark.parametrize("method", ["svfit", "sorsa", "svft", "loldu", "lora_sb"])
def test_folder_names_the_method_and_keeps_its_fields(tiny, tmp_path, method):
    import json

    from splice.adapters.model import configs

    fields = {"svfit": dict(r=3), "sorsa": dict(r=3, gamma=0.01), "svft": dict(pattern="banded", off_diag=1),
              "loldu": dict(r=3, lora_alpha=2.0), "lora_sb": dict(r=3, init_weights="svd")}[method]
    config = make_config(method, target_modules=["query"], **fields)
    path = splice.save_adapter(splice.adapt(tiny["bert"].build(), config), tmp_path / method)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] is None and cfg["splice_method"] == method
    assert {k: cfg[k] for k in fields} == fields
    assert configs(splice.load_adapter(tiny["bert"].build(), path))["default"] == config
