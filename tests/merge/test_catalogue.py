"""The research merge methods (PCB, LiNeS, DAREx, TSV/Iso-C, Fisher, RegMean) and their calibration statistics.

Each test builds a case where the paper says what must happen and checks that it does. Everything is tiny and on
the CPU; random draws come from seeded generators.
"""
from __future__ import annotations

import importlib
import inspect
import json

import helpers
import pytest
import torch
from torch import nn

from splice.errors import SpliceError
from splice.merge.calibration import Calibration, calibrate, compute_fisher, compute_gram, sampled_label_loss
from splice.merge.methods.darex import darex_drop, darex_q
from splice.merge.methods.lines import lines_scale
from splice.merge.methods.pcb import pcb_weights
from splice.merge.methods.registry import MERGE_METHODS, TensorContext
from splice.merge.methods.tsv import tsv_rank

MINE = {"pcb": "pcb", "lines": "lines", "darex": "darex", "tsv": "tsv", "iso_c": "tsv", "fisher": "fisher",
        "regmean": "regmean"}


def method(name: str):
    importlib.import_module(f"splice.merge.methods.{MINE[name]}")  # only these modules: others may be mid-edit
    return MERGE_METHODS[name]


def run(name: str, tensors, *, base=None, layer=None, num_layers=None, extras=None, seed=0, **params):
    ctx = TensorContext(name="model.layers.0.mlp.up_proj.weight", layer=layer, num_layers=num_layers,
                        generator=torch.Generator().manual_seed(seed), extras=extras or {})
    m = method(name)
    if base is None and m.space == "delta":
        base = torch.zeros_like(tensors[0])
    return m.fn(base, list(tensors), ctx=ctx, **params)


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", sorted(MINE))
def test_registered_with_paper_link(name):
    m = method(name)
    assert m.reference.startswith("https://arxiv.org/abs/")
    assert m.reference in inspect.getmodule(m.fn).__doc__  # the module docstring names the paper it implements
    assert "http" in (inspect.getmodule(m.fn).__doc__ or "")
    assert m.space == ("weights" if name in ("fisher", "regmean") else "delta")
    if name == "fisher":
        assert m.needs == {"fisher"}
    if name == "regmean":
        assert m.needs == {"gram"}


# ----------------------------------------------------------------------------------------------- PCB
def test_pcb_keeps_exactly_density_of_each_task():
    tvs = [torch.randn(10, 20, generator=g(i)) for i in range(3)]
    weights, _ = pcb_weights(tvs, density=0.2)
    assert weights.shape == (3, 10, 20)
    assert [(w > 0).sum().item() for w in weights] == [40, 40, 40]
    assert weights.max() <= 1.0 and weights.min() >= 0.0
    per_task, _ = pcb_weights(tvs, density=[0.1, 0.2, 0.3])  # density is a per-model parameter
    assert [(w > 0).sum().item() for w in per_task] == [20, 40, 60]


def pcb_case() -> list[torch.Tensor]:
    """Three tasks over 50 parameters, each with 10 parameters that are large *and* agree with the others.

    Task 0 is also large (−1) on 10..14, where tasks 1 and 2 pull the other way (+1): large inside its own task
    (high intra score) but in conflict with the sum of tasks (negative inter score), so PCB must drop it there.
    """
    t0, t1, t2 = (torch.full((50,), 0.01) for _ in range(3))
    t0[0:10] = 1.0
    t0[10:15] = -1.0
    t1[10:20] = 1.0
    t2[10:15] = 1.0
    t2[20:25] = 1.0
    return [t0, t1, t2]


def test_pcb_drops_low_intra_and_conflicting_parameters():
    weights, _ = pcb_weights(pcb_case(), density=0.2)
    kept = [set(torch.nonzero(w > 0).flatten().tolist()) for w in weights]
    assert kept[0] == set(range(0, 10))  # its conflicting large entries 10..14 are dropped, its small ones too
    assert kept[1] == set(range(10, 20))
    assert kept[2] == set(range(10, 15)) | set(range(20, 25))


def test_pcb_merge_rescales_by_the_kept_scores():
    merged = run("pcb", pcb_case(), density=0.2)
    expected = torch.zeros(50)
    expected[0:25] = 1.0  # each kept entry alone, or two equal ones averaged; task 0's −1 never enters
    torch.testing.assert_close(merged, expected)
    doubled = run("pcb", pcb_case(), density=0.2, weight=[2.0, 2.0, 2.0], **{"lambda": 0.5})
    torch.testing.assert_close(doubled, expected)


def test_pcb_rejects_bad_density():
    with pytest.raises(SpliceError, match="density"):
        run("pcb", pcb_case(), density=0.0)


# ----------------------------------------------------------------------------------------------- LiNeS
def test_lines_scale_grows_linearly_with_depth():
    ctx = lambda layer: TensorContext(name="x", layer=layer, num_layers=5)  # noqa: E731
    factors = [lines_scale(ctx(l), alpha=0.2, beta=0.6) for l in range(5)]
    assert factors == pytest.approx([0.2, 0.35, 0.5, 0.65, 0.8])
    assert lines_scale(TensorContext(name="model.embed_tokens.weight"), 0.2, 0.6) == 0.2  # non-layer: alpha
    assert lines_scale(TensorContext(name="x", layer=0, num_layers=1), 0.2, 0.6) == 0.2


def test_lines_method_is_task_arithmetic_times_the_depth_factor():
    tvs = [torch.ones(3, 4) * (i + 1) for i in range(4)]  # Σ τ_i = 10
    for layer, factor in [(0, 0.25), (3, 0.625), (6, 1.0)]:  # defaults: α = 1/4, β = 3/4 over 7 blocks
        out = run("lines", tvs, layer=layer, num_layers=7)
        torch.testing.assert_close(out, torch.full((3, 4), 10.0 * factor))
    head = run("lines", tvs, layer=None, num_layers=7)  # the output head: α
    torch.testing.assert_close(head, torch.full((3, 4), 2.5))
    weighted = run("lines", tvs, layer=6, num_layers=7, alpha=0.1, beta=0.4, weight=[1.0, 0.0, 0.0, 0.5])
    torch.testing.assert_close(weighted, torch.full((3, 4), (1 + 2) * 0.5))


def test_lines_single_model_defaults_to_identity():
    tv = torch.randn(4, 4, generator=g(0))
    torch.testing.assert_close(run("lines", [tv], layer=0, num_layers=4), tv)


# ----------------------------------------------------------------------------------------------- DAREx
def shifted_delta() -> torch.Tensor:
    """A fine-tuning-like delta with a non-zero mean (the regime where DARE's 1/(1 − p) hurts most)."""
    return 0.002 + 0.005 * torch.randn(64, 256, generator=g(1))


def test_darex_keeps_norm_and_row_means_better_than_dare_at_p099():
    delta = shifted_delta()
    gen = g(123)
    norm_err = {"dare": [], "darex": []}
    row_err = {"dare": [], "darex": []}
    for _ in range(200):
        for mode, key in (("dare", "dare"), ("output", "darex")):
            pruned = darex_drop(delta, 0.01, gen, q_mode=mode)
            norm_err[key].append(abs(pruned.norm() / delta.norm() - 1).item())
            row_err[key].append((pruned.sum(1) - delta.sum(1)).pow(2).mean().item())
    mean = {k: sum(v) / len(v) for k, v in row_err.items()}
    norm = {k: sum(v) / len(v) for k, v in norm_err.items()}
    assert norm["dare"] > 8.0  # DARE's norm grows like 1/√(1 − p) = 10
    assert norm["darex"] < 0.5 * norm["dare"]
    assert mean["darex"] < 0.5 * mean["dare"]  # the expected output change of the row sums is far smaller


def test_darex_norm_mode_keeps_the_norm_exactly():
    delta = shifted_delta()
    pruned = darex_drop(delta, 0.01, g(5), q_mode="norm")
    assert (pruned != 0).float().mean().item() == pytest.approx(0.01, abs=0.004)
    assert pruned.norm().item() == pytest.approx(delta.norm().item(), rel=1e-5)


def test_darex_q_rule():
    p = 0.99
    coherent = torch.full((8, 100), 0.01)  # every row sums coherently: q = (1 − p) + p/100, close to DARE
    assert darex_q(coherent, 1 - p) == pytest.approx((1 - p) + p / 100)
    cancelling = torch.tensor([[1.0, -1.0] * 50] * 8)  # row sums are 0: rescaling can only add error
    assert darex_q(cancelling, 1 - p) == 1.0
    noise = torch.randn(8, 100, generator=g(2))
    assert darex_q(noise, 1 - p, second_moment=torch.eye(100)) == 1.0  # isotropic inputs: no rescaling
    ones = torch.ones(100, 100)  # the data-free default is the constant input x = 1
    assert darex_q(noise, 1 - p, second_moment=ones) == pytest.approx(darex_q(noise, 1 - p), rel=1e-6)
    assert 1 - p <= darex_q(shifted_delta(), 1 - p) <= 1.0


def test_darex_method_is_seeded_and_weighted():
    tvs = [shifted_delta(), -shifted_delta()]
    a = run("darex", tvs, density=[0.1, 0.1], weight=[1.0, 0.5], seed=7)
    b = run("darex", tvs, density=[0.1, 0.1], weight=[1.0, 0.5], seed=7)
    torch.testing.assert_close(a, b)
    full = run("darex", tvs, density=[1.0, 1.0], weight=[1.0, 0.5])
    torch.testing.assert_close(full, tvs[0] + 0.5 * tvs[1])
    fixed = run("darex", [shifted_delta()], density=[0.5], q=1.0, seed=3)
    kept = fixed != 0
    torch.testing.assert_close(fixed[kept], shifted_delta()[kept])  # q = 1: survivors not rescaled
    with pytest.raises(SpliceError, match="q_mode"):
        run("darex", tvs, density=[0.1, 0.1], q_mode="nrom")


# ----------------------------------------------------------------------------------------------- TSV / Iso-C
def orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g(seed), dtype=torch.float64))[0]


def test_tsv_reconstructs_tasks_in_disjoint_subspaces_exactly():
    qu, qv = orthogonal(12, 0), orthogonal(9, 1)
    tasks = []
    for i in range(3):  # k = ⌊9/3⌋ = 3 triplets each, in mutually orthogonal column and row spaces
        s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) * (i + 1)
        tasks.append((qu[:, 3 * i:3 * i + 3] * s @ qv[:, 3 * i:3 * i + 3].T).float())
    merged = run("tsv", tasks)
    torch.testing.assert_close(merged, sum(tasks), atol=1e-5, rtol=1e-5)


def test_tsv_respects_the_rank_budget():
    tasks = [torch.randn(20, 10, generator=g(i)) for i in range(3)]
    k = tsv_rank((20, 10), 3)
    assert k == 3
    merged = run("tsv", tasks)
    assert torch.linalg.matrix_rank(merged).item() == 3 * k  # 9 < min(20, 10): each task kept only its top 3
    # the kept spectrum is the union of the tasks' top-k singular values, rearranged by orthogonal factors only
    tops = torch.cat([torch.linalg.svdvals(t)[:k] for t in tasks]).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(merged)[:9], tops, atol=1e-4, rtol=1e-4)
    single = torch.randn(6, 4, generator=g(9))
    torch.testing.assert_close(run("tsv", [single], alpha=0.5), 0.5 * single, atol=1e-5, rtol=1e-5)


def test_tsv_averages_non_matrix_tensors():
    vecs = [torch.randn(7, generator=g(i)) for i in range(3)]
    torch.testing.assert_close(run("tsv", vecs), sum(vecs) / 3)


def test_iso_c_flattens_the_spectrum_of_the_sum():
    tasks = [torch.randn(8, 6, generator=g(i)) for i in range(3)]
    total = sum(tasks)
    merged = run("iso_c", tasks)
    s_sum, s_iso = torch.linalg.svdvals(total), torch.linalg.svdvals(merged)
    torch.testing.assert_close(s_iso, torch.full_like(s_iso, s_sum.mean().item()), atol=1e-4, rtol=1e-4)
    u, _, vh = torch.linalg.svd(total, full_matrices=False)
    torch.testing.assert_close(merged, s_sum.mean() * u @ vh, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- Fisher
def models3() -> list[torch.Tensor]:
    return [torch.randn(4, 5, generator=g(i)) for i in range(3)]


def test_fisher_dominant_model_wins():
    thetas = models3()
    fishers = [torch.ones(4, 5), torch.full((4, 5), 1e6), torch.ones(4, 5)]
    out = run("fisher", thetas, extras={"fisher": fishers})
    torch.testing.assert_close(out, thetas[1], atol=1e-5, rtol=1e-5)


def test_fisher_equal_fishers_give_the_average():
    thetas = models3()
    f = torch.rand(4, 5, generator=g(3)) + 0.1
    torch.testing.assert_close(run("fisher", thetas, extras={"fisher": [f, f, f]}), sum(thetas) / 3)
    weighted = run("fisher", thetas, extras={"fisher": [f, f, f]}, weight=[1.0, 1.0, 2.0])
    torch.testing.assert_close(weighted, (thetas[0] + thetas[1] + 2 * thetas[2]) / 4)
    for bad in ([1.0, -1.0, 0.0], [0.0, 0.0, 0.0]):  # inf / NaN weights before, now one line
        with pytest.raises(SpliceError, match="fisher weights must be non-negative with a positive sum"):
            run("fisher", thetas, extras={"fisher": [f, f, f]}, weight=bad)


def test_fisher_is_elementwise_and_floored():
    thetas = models3()[:2]
    f0, f1 = torch.zeros(4, 5), torch.zeros(4, 5)
    f0[:2], f1[2:] = 1e3, 1e3
    out = run("fisher", thetas, extras={"fisher": [f0, f1]})
    torch.testing.assert_close(out[:2], thetas[0][:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:], thetas[1][2:], atol=1e-5, rtol=1e-5)
    zero = run("fisher", thetas, extras={"fisher": [torch.zeros(4, 5), torch.zeros(4, 5)]})  # floor: average
    torch.testing.assert_close(zero, (thetas[0] + thetas[1]) / 2)


def test_fisher_missing_statistics():
    thetas = models3()
    torch.testing.assert_close(run("fisher", thetas, extras={"fisher": [None] * 3}), sum(thetas) / 3)
    with pytest.raises(SpliceError, match=r"no Fisher tensor for model\(s\) \[1\]"):
        run("fisher", thetas, extras={"fisher": [torch.ones(4, 5), None, torch.ones(4, 5)]})
    with pytest.raises(SpliceError, match=r"a Fisher tensor for 2 models, but 3 models to merge"):
        run("fisher", thetas, extras={"fisher": [torch.ones(4, 5)] * 2})
    with pytest.raises(SpliceError, match=r"no Gram matrix for model\(s\) \[0\]"):
        run("regmean", [t[:, :4] for t in thetas], extras={"gram": [None, torch.eye(4), torch.eye(4)]})


# ----------------------------------------------------------------------------------------------- RegMean
def regression_case(n_models=3, n_in=6, n_out=4, rows=40):
    xs = [torch.randn(rows, n_in, generator=g(10 + i), dtype=torch.float64) for i in range(n_models)]
    ws = [torch.randn(n_out, n_in, generator=g(20 + i), dtype=torch.float64) for i in range(n_models)]
    return xs, ws, [x.T @ x for x in xs]


def test_regmean_alpha_one_is_the_least_squares_merge():
    xs, ws, grams = regression_case()
    a = torch.cat(xs)
    b = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    lstsq = torch.linalg.lstsq(a, b).solution.T  # min Σ ‖X_i Wᵀ − X_i W_iᵀ‖²
    exact = run("regmean", ws, extras={"gram": grams}, alpha=1.0, epsilon=0.0)
    torch.testing.assert_close(exact, lstsq, atol=1e-10, rtol=1e-10)
    ridged = run("regmean", [w.float() for w in ws], extras={"gram": [gm.float() for gm in grams]}, alpha=1.0)
    torch.testing.assert_close(ridged, lstsq.float(), atol=1e-4, rtol=1e-4)


def test_regmean_alpha_zero_is_a_gram_diagonal_weighted_average():
    _, ws, grams = regression_case()
    out = run("regmean", ws, extras={"gram": grams}, alpha=0.0, epsilon=0.0)
    d = torch.stack([torch.diagonal(gm) for gm in grams])  # (models, in)
    expected = sum(w * d[i] for i, w in enumerate(ws)) / d.sum(0)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


def test_regmean_conv1d_layout_and_fallbacks():
    xs, ws, grams = regression_case(n_in=6, n_out=4)
    linear = run("regmean", ws, extras={"gram": grams})
    conv1d = run("regmean", [w.T for w in ws], extras={"gram": grams})  # (in, out), told apart by shape
    torch.testing.assert_close(conv1d, linear.T)
    sq_xs, sq_ws, sq_grams = regression_case(n_in=5, n_out=5)
    as_linear = run("regmean", sq_ws, extras={"gram": sq_grams})
    as_conv1d = run("regmean", [w.T for w in sq_ws], extras={"gram": sq_grams}, layout="in_out")
    torch.testing.assert_close(as_conv1d, as_linear.T)
    bias = [torch.randn(4, generator=g(i)) for i in range(3)]
    torch.testing.assert_close(run("regmean", bias, extras={"gram": [None] * 3}), sum(bias) / 3)
    with pytest.raises(SpliceError, match="does not fit"):
        run("regmean", [torch.randn(3, 7) for _ in range(3)], extras={"gram": grams})


def test_regmean_unused_input_feature_takes_the_average():
    xs, ws, _ = regression_case()
    for x in xs:
        x[:, 2] = 0.0  # no calibration token ever reaches input feature 2
    out = run("regmean", ws, extras={"gram": [x.T @ x for x in xs]}, alpha=1.0)
    torch.testing.assert_close(out[:, 2], sum(w[:, 2] for w in ws) / 3, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- calibration
def test_compute_gram_of_a_sequential_equals_xtx_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [torch.randn(6, 4, generator=g(i)) for i in range(3)]
    grams = compute_gram(net, batches)
    assert set(grams) == {"0.weight", "2.weight"}
    x = torch.cat(batches)
    h = torch.relu(net[0](x)).detach()
    torch.testing.assert_close(grams["0.weight"], x.T @ x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grams["2.weight"], h.T @ h, atol=1e-5, rtol=1e-5)


def test_compute_gram_excludes_padding(tiny):
    model = tiny["llama"].build()
    lengths = [6, 3, 4]
    ids = torch.randint(3, 100, (3, 6), generator=g(0))
    mask = torch.zeros(3, 6, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    padded = compute_gram(model, [{"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}])
    # By hand: each row alone, without its padding, and the Grams summed.
    alone = [compute_gram(model, [{"input_ids": ids[r:r + 1, :n]}]) for r, n in enumerate(lengths)]
    names = {n for n, _ in model.named_parameters() if n.endswith(".weight")}
    assert "model.layers.0.self_attn.q_proj.weight" in padded and "lm_head.weight" in padded
    assert set(padded) <= names | {"lm_head.weight"}
    for name, gram in padded.items():
        n_in = gram.shape[0]
        assert gram.shape == (n_in, n_in)
        torch.testing.assert_close(gram, sum(a[name] for a in alone), atol=1e-4, rtol=1e-4)


def test_compute_gram_on_hf_conv1d(tiny):
    model = tiny["gpt2"].build()
    batch = tiny["gpt2"].batch()
    grams = compute_gram(model, [batch])
    seen = {}
    block = model.transformer.h[0]
    handle = block.attn.c_attn.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach()))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1])
    torch.testing.assert_close(grams["transformer.h.0.attn.c_attn.weight"], x.T @ x, atol=1e-4, rtol=1e-4)
    assert grams["transformer.h.0.mlp.c_proj.weight"].shape == (128, 128)  # Conv1D (in, out) = (4·32, 32)


def test_compute_fisher_equals_mean_squared_gradients_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batches = [(torch.randn(5, 3, generator=g(i)), torch.randn(5, 2, generator=g(50 + i))) for i in range(3)]

    def loss_fn(model, batch):
        x, y = batch
        return (model(x) - y).pow(2).mean()

    fisher = compute_fisher(net, batches, loss_fn)
    params = dict(net.named_parameters())
    by_hand = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in batches:
        grads = torch.autograd.grad(loss_fn(net, b), list(params.values()))
        for n, gr in zip(params, grads):
            by_hand[n] += gr.pow(2) / len(batches)
    assert set(fisher) == set(params)
    for n in params:
        torch.testing.assert_close(fisher[n], by_hand[n])
    per_example = compute_fisher(net, batches, loss_fn, per_example=True)
    rows = [(x[i:i + 1], y[i:i + 1]) for x, y in batches for i in range(5)]
    for n, p in params.items():
        expected = sum(torch.autograd.grad(loss_fn(net, r), p)[0].pow(2) for r in rows) / len(rows)
        torch.testing.assert_close(per_example[n], expected)
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(SpliceError, match="no calibration batches"):
        compute_fisher(net, [], loss_fn)


def test_sampled_label_loss_draws_labels_from_the_prediction_for_tensor_or_hf_outputs():
    net = nn.Linear(3, 4)
    x = torch.randn(6, 3, generator=g(1))

    class WithLogits(nn.Module):  # an HF-style output object
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return type("Out", (), {"logits": self.net(x)})()

    plain, wrapped = sampled_label_loss(7)(net, x), sampled_label_loss(7)(WithLogits(), x)
    logits = net(x)
    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(plain, nn.functional.cross_entropy(logits, y.squeeze(-1)))
    torch.testing.assert_close(wrapped, plain)  # same seed, same draw, either output form
    one = sampled_label_loss(7)
    assert not torch.equal(torch.stack([one(net, x) for _ in range(5)]), plain.expand(5))  # one generator, fresh draws


def test_compute_fisher_uses_the_model_loss(tiny):
    model = tiny["gpt2"].build()
    batch = tiny["gpt2"].batch()
    fisher = compute_fisher(model, [{**batch, "labels": batch["input_ids"]}])
    params = dict(model.named_parameters())
    assert set(fisher) == set(params)
    assert all(fisher[n].shape == p.shape and (fisher[n] >= 0).all() for n, p in params.items())
    assert fisher["transformer.h.0.attn.c_attn.weight"].sum() > 0
    with pytest.raises(SpliceError, match="no loss"):
        compute_fisher(model, [batch])


def test_calibration_save_load_round_trip(tmp_path):
    cal = Calibration(meta={"data_file": "x.jsonl"})
    cal.add("gram", [{"transformer.h.0.attn.c_attn.weight": torch.randn(4, 4, generator=g(i))} for i in range(2)])
    cal.add("fisher", [{"transformer.h.0.attn.c_attn.weight": torch.rand(4, 12, generator=g(5 + i)),
                        "transformer.wte.weight": torch.rand(9, 4, generator=g(7 + i))} for i in range(2)])
    folder = cal.save(tmp_path / "cal")
    assert json.loads((folder / "calibration.json").read_text())["num_models"] == 2
    back = Calibration.load(folder)
    assert back.kinds == ["fisher", "gram"] and back.num_models == 2 and back.meta == {"data_file": "x.jsonl"}
    for kind in cal.kinds:
        for i in range(2):
            for name, t in cal.data[kind][i].items():
                torch.testing.assert_close(back.get(kind, i, name), t)
    # checkpoint names without the model's prefix still find their tensor; unknown names give None
    assert torch.equal(back.get("gram", 1, "h.0.attn.c_attn.weight"), cal.data["gram"][1][
        "transformer.h.0.attn.c_attn.weight"])
    assert back.get("gram", 0, "lm_head.weight") is None
    with pytest.raises(SpliceError, match="kind='grad'|no 'grad'"):
        back.get("grad", 0, "x")
    with pytest.raises(SpliceError, match="model index 2"):
        back.get("gram", 2, "x")
    with pytest.raises(SpliceError, match="exists"):
        cal.save(folder)
    (folder / "gram-00001.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(SpliceError, match="gram-00001"):
        Calibration.load(folder)
    with pytest.raises(SpliceError, match="does not exist"):
        Calibration.load(tmp_path / "nowhere")


def word_tokenizer():
    return helpers.word_tokenizer("the a movie film was is good bad very fine".split())


def test_calibrate_models_from_folders_and_merge_with_the_statistics(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folders = []
    for seed in range(2):
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=16, n_embd=8, n_layer=2, n_head=2, n_positions=32, bos_token_id=2,
                         eos_token_id=2)
        path = tmp_path / f"gpt2-{seed}"
        GPT2LMHeadModel(cfg).save_pretrained(path)
        word_tokenizer().save_pretrained(path)
        folders.append(path)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the movie was", "completion": w}) + "\n"
                            for w in ["good", "bad very", "fine", "very good", "bad"] * 2))
    lines = []
    cal = calibrate(folders, data, ["fisher", "gram"], batch_size=3, max_batches=2, log=lines.append)
    assert cal.num_models == 2 and len(lines) == 2 and cal.meta["architectures"] == ["causal-lm"] * 2
    name = "h.0.attn.c_attn.weight"  # as the checkpoint stores it
    grams = [cal.get("gram", i, name) for i in range(2)]
    fishers = [cal.get("fisher", i, name) for i in range(2)]
    assert grams[0].shape == (8, 8) and fishers[0].shape == (8, 24)
    assert not torch.equal(grams[0], grams[1])  # different models, different activations on the same data
    weights = [GPT2LMHeadModel.from_pretrained(f).transformer.h[0].attn.c_attn.weight.detach() for f in folders]
    merged = run("regmean", weights, extras={"gram": grams})
    assert merged.shape == (8, 24) and torch.isfinite(merged).all()
    # (in, out) Conv1D weights with their (in, in) Grams: RegMean matches each model's outputs better than the mean
    mean = sum(weights) / 2

    def err(w):
        return sum(torch.trace((w - wi).T @ gm @ (w - wi)) for wi, gm in zip(weights, grams))

    assert err(run("regmean", weights, extras={"gram": grams}, alpha=1.0)) < err(mean)
    fused = run("fisher", weights, extras={"fisher": fishers})
    assert fused.shape == (8, 24) and torch.isfinite(fused).all()
    cal.save(tmp_path / "cal")
    assert torch.equal(Calibration.load(tmp_path / "cal").get("gram", 1, name), grams[1])


def test_calibrate_rejects_bad_requests(tmp_path):
    with pytest.raises(SpliceError, match="unknown calibration kind 'fishr'"):
        calibrate(["x"], tmp_path / "d.jsonl", "fishr")
    with pytest.raises(SpliceError, match="at least one model"):
        calibrate([], tmp_path / "d.jsonl", "gram")


TEXTS = ["the movie was good", "a film is bad", "the film was very fine", "a movie is very bad", "good film"] * 2


def gpt2_folder(path, seed: int, base=None):
    """A tiny GPT-2 folder with a tokenizer; with `base`, a fine-tune of it (base + noise)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=2, n_head=2, n_positions=32,
                                       bos_token_id=2, eos_token_id=2))
    if base is not None:
        model.load_state_dict(GPT2LMHeadModel.from_pretrained(base).state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["regmean", "fisher"])
def test_merge_with_calibration_texts_full_model_and_lora(tmp_path, name):
    """splice.merge.merge computes the extras (Extras) and the result equals the method on `calibrate`'s stats."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    import splice.merge

    base = gpt2_folder(tmp_path / "base", 0)
    ft = gpt2_folder(tmp_path / "ft", 1, base=base)
    torch.manual_seed(3)
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(base),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    lora_full = tmp_path / "lora-full"  # the same model as base + adapter, as a plain folder, for the reference
    peft_model.merge_and_unload().save_pretrained(lora_full)
    word_tokenizer().save_pretrained(lora_full)

    config = {"merge_method": name, "dtype": "float32",
              "models": [{"model": str(ft)}, {"model": f"{base}+{tmp_path / 'adapter'}"}]}
    out = splice.merge.merge(config, tmp_path / "out", calibration=TEXTS, progress=False)
    merged = load_file(out / "model.safetensors")

    kind = "gram" if name == "regmean" else "fisher"
    cal = calibrate([ft, lora_full], TEXTS, kind)
    key = "transformer.h.1.attn.c_attn.weight"  # its inputs pass through the adapted layer 0
    key = key if key in merged else key.removeprefix("transformer.")
    weights = [load_file(f / "model.safetensors")[key] for f in (ft, lora_full)]
    stats = [cal.get(kind, i, key) for i in range(2)]
    expected = run(name, weights, extras={kind: stats})
    torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected, (weights[0] + weights[1]) / 2, atol=1e-4)  # not just the average
    if name == "regmean":  # a square Conv1D weight is (in, out): the plan knows it from the architecture
        square = key.replace("c_attn", "c_proj")
        ws = [load_file(f / "model.safetensors")[square] for f in (ft, lora_full)]
        assert ws[0].shape[0] == ws[0].shape[1]
        want = run(name, ws, extras={kind: [cal.get(kind, i, square) for i in range(2)]}, layout="in_out")
        torch.testing.assert_close(merged[square], want, atol=1e-5, rtol=1e-4)
    # a saved calibration folder serves the merge as well (its models in the config's order)
    cal.save(tmp_path / "cal")
    again = splice.merge.merge(config, tmp_path / "out2", calibration=tmp_path / "cal", progress=False)
    torch.testing.assert_close(load_file(again / "model.safetensors")[key], merged[key], atol=1e-6, rtol=1e-6)


def test_calibrate_classifiers_and_encoders(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cfg = BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "cls")
    BertModel(cfg).save_pretrained(tmp_path / "enc")
    for name in ("cls", "enc"):
        word_tokenizer().save_pretrained(tmp_path / name)
    csv = tmp_path / "labelled.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(TEXTS)))
    labelled = calibrate([tmp_path / "cls"], csv, ["fisher", "gram"], batch_size=4)
    drawn = calibrate([tmp_path / "cls"], TEXTS, "fisher", batch_size=4)  # no labels: drawn from the model
    key = "bert.encoder.layer.0.attention.self.query.weight"
    for cal in (labelled, drawn):
        assert cal.get("fisher", 0, key).shape == (8, 8) and cal.get("fisher", 0, key).sum() > 0
    assert labelled.get("gram", 0, "classifier.weight").shape == (8, 8)
    assert not torch.equal(labelled.get("fisher", 0, key), drawn.get("fisher", 0, key))
    enc = calibrate([tmp_path / "enc"], TEXTS, "gram")
    assert enc.get("gram", 0, "encoder.layer.0.attention.self.query.weight").shape == (8, 8)
    with pytest.raises(SpliceError, match="no loss for the Fisher"):
        calibrate([tmp_path / "enc"], TEXTS, "fisher")


def test_read_texts(tmp_path):
    from splice.merge.calibration import read_texts

    txt = tmp_path / "t.txt"
    txt.write_text("one text\n\n  two  \n")
    assert read_texts(txt) == [("", "one text"), ("", "two")]
    assert read_texts(["a", " ", "b"]) == [("", "a"), ("", "b")]
    with pytest.raises(SpliceError, match="empty"):
        read_texts([])
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(SpliceError, match="empty"):
        read_texts(tmp_path / "e.txt")
