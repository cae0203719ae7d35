"""Merge methods: parity with mergekit (the reference, installed for tests only), what each paper says, the schema.

1. Parity: the same float32 tensors through mergekit's own per-tensor entry point
   (`mergekit.merge_methods.api.merge_tensors`, which runs each method's kernel on one tensor group) and through
   ours; max abs difference ≤ 1e-6 (in practice every case is bit-identical: same ops in the same order). Random methods (DARE, DELLA) match *exactly* when our generator and torch's
   global one get the same seed (mergekit draws from the global RNG), and are also tested by their statistics.
2. Constructed cases: hand-made vectors where the paper's rule gives a known answer.
3. The registry: links, defaults, space/needs_base, and defaults equal to mergekit's.

Delta-space methods return the merged delta; below they are compared as base + delta, mergekit's output.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.merge.methods import sparsify as sp
from splice.merge.methods.registry import TensorContext, get_merge_method, merge_method_names

import mergekit.merge_methods.api as mk_api  # noqa: E402
from mergekit import sparsify as mk_sparsify  # noqa: E402
from mergekit.merge_methods import registry as mk_registry  # noqa: E402
from mergekit.merge_methods.generalized_task_arithmetic import (  # noqa: E402
    ConsensusMethod, GeneralizedTaskArithmeticMerge)
from mergekit.sparsify import SparsificationMethod  # noqa: E402

ATOL = 1e-6
SHAPES = [(7,), (5, 6), (3, 4, 2)]


# ---------------------------------------------------------------- helpers

def rand(shape: tuple[int, ...], n: int, seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    """A base and `n` fine-tunes of it (base + N(0, 0.5²) deltas), float32."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.5 * torch.randn(shape, generator=g) for _ in range(n)]


def ours(name: str, base: Tensor | None, models: list[Tensor], *, seed: int | None = None, **params) -> Tensor:
    """Our method on full weights: deltas in and base + delta out for space='delta'."""
    m = get_merge_method(name)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ctx = TensorContext(name="w", generator=gen)
    if m.space == "delta":
        return base + m.fn(base, [x - base for x in models], ctx=ctx, **params)
    return m.fn(base, models, ctx=ctx, **params)


def theirs(method, base: Tensor | None, models: list[Tensor], *, seed: int | None = None, **params) -> Tensor:
    """mergekit's kernel for one tensor group (the base first, when there is one)."""
    tensors = ([base] if base is not None else []) + models
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        return mk_api.merge_tensors(tensors, method, parameters=params, base_index=0 if base is not None else None)


def assert_close(a: Tensor, b: Tensor, atol: float = ATOL, what: str = "") -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"


def weights_for(n: int) -> list[float]:
    return [1.0, 0.5, -0.3, 0.8][:n]


def mk_gta(sparsify: str, consensus: str) -> GeneralizedTaskArithmeticMerge:
    """mergekit's generalized task arithmetic at any grid point, including ones it does not register (count)."""
    names = {"magnitude": SparsificationMethod.magnitude, "random": SparsificationMethod.random,
             "magnitude_outliers": SparsificationMethod.magnitude_outliers,
             "rank_magnitude_sampling": SparsificationMethod.della_magprune}
    return GeneralizedTaskArithmeticMerge(
        consensus_method=None if consensus == "none" else ConsensusMethod(consensus),
        sparsification_method=names.get(sparsify), default_normalize=False, default_rescale=False,
        method_name=f"gta_{sparsify}_{consensus}", method_pretty_name=None, method_reference_url=None)


# ---------------------------------------------------------------- 1. parity with mergekit

GTA_CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"normalize": True, "lambda": 0.7}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": [0.3, 0.6, 1.0, 0.2], "normalize": False, "int8_mask": True}),
    ("ties", {"density": 0.4, "rescale": True, "lambda": 1.3}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.1}),
    ("breadcrumbs", {"density": [0.9, 0.5, 0.7, 0.4], "gamma": [0.2, 0.0, 0.1, 0.3], "rescale": True}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05, "normalize": True}),
]


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name,params", GTA_CASES, ids=lambda x: x if isinstance(x, str) else "")
def test_gta_parity(name, params, shape, n):
    base, models = rand(shape, n, seed=n)
    params = {k: v[:n] if isinstance(v, list) else v for k, v in params.items()}
    params["weight"] = weights_for(n)
    assert_close(ours(name, base, models, **params), theirs(name, base, models, **params))


@pytest.mark.parametrize("consensus", ["none", "sum", "count"])
@pytest.mark.parametrize("sparsify", ["none", "magnitude", "magnitude_outliers"])
def test_generalized_grid_parity(sparsify, consensus):
    """Every deterministic point of sparsify × consensus, including mergekit's unregistered `count` consensus."""
    base, models = rand((6, 5), 3, seed=7)
    params = {"weight": [0.9, 0.4, 0.6], "density": [0.5, 0.7, 0.3], "normalize": True}
    mine = dict(params, sparsify=sparsify, consensus=consensus, gamma=0.05)
    ref = dict(params, **({"gamma": 0.05} if sparsify == "magnitude_outliers" else {}))
    assert_close(ours("generalized_task_arithmetic", base, models, **mine),
                 theirs(mk_gta(sparsify, consensus), base, models, **ref))


RANDOM_CASES = [
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": [0.3, 0.8, 0.5]}),
    ("dare_ties", {"density": 0.6, "rescale": False, "normalize": True}),
    ("della", {"density": 0.5, "epsilon": 0.2}),
    ("della_linear", {"density": [0.4, 0.6, 0.5], "epsilon": [0.1, 0.3, 0.2], "lambda": 0.8}),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name,params", RANDOM_CASES, ids=lambda x: x if isinstance(x, str) else "")
def test_random_methods_match_mergekit_draw_for_draw(name, params, shape, monkeypatch):
    """Masks drawn as mergekit draws them (torch.bernoulli) from the same seed as torch's global RNG → the same
    masks, so exact parity (1e-6) of everything else: rescaling, consensus, weights. splice's own faster draw is
    equal in law, tested below by its statistics."""
    monkeypatch.setattr(sp, "MASK_DRAW", "bernoulli")
    base, models = rand(shape, 3, seed=3)
    params = dict(params, weight=[1.0, 0.6, 0.3])
    assert_close(ours(name, base, models, seed=11, **params), theirs(name, base, models, seed=11, **params))


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.2, 0.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sce_parity(shape, select_topk):
    base, models = rand(shape, 3, seed=5)
    assert_close(ours("sce", base, models, select_topk=select_topk),
                 theirs("sce", base, models, select_topk=select_topk))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_parity(shape, n, normalize):
    _, models = rand(shape, n, seed=n)
    w = [0.2, 1.5, -0.7, 0.4][:n]
    assert_close(ours("linear", None, models, weight=w, normalize=normalize),
                 theirs("linear", None, models, weight=w, normalize=normalize))


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_model_stock_parity(shape, n, filter_wise):
    base, models = rand(shape, n, seed=n + 1)
    assert_close(ours("model_stock", base, models, filter_wise=filter_wise),
                 theirs("model_stock", base, models, filter_wise=filter_wise))


@pytest.mark.parametrize("t", [0.0, 0.001, 0.05, 0.5, 3.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nearswap_parity(shape, t):
    base, (other,) = rand(shape, 1, seed=2)
    near = torch.arange(other.numel()).reshape(shape) % 2 == 0
    models = [torch.where(near, base + 0.01 * (other - base), other)]  # half the entries within ~0.005 of the base
    models[0].view(-1)[0] = base.view(-1)[0]  # and one identical entry
    assert_close(ours("nearswap", base, models, t=t), theirs("nearswap", base, models, t=t))


def _slerp_pairs(shape):
    base, (other,) = rand(shape, 1, seed=4)
    yield "random", base, other
    yield "colinear", base, 2.5 * base                      # |cos| > 0.9995: lerp branch
    side = other - (other * base).sum() / (base * base).sum() * base  # orthogonal to the base
    yield "near-colinear", base, 1.3 * (base + 0.025 * side * base.norm() / side.norm())  # cos ≈ 0.9997: lerp
    yield "just-off-colinear", base, 1.3 * (base + 0.035 * side * base.norm() / side.norm())  # cos ≈ 0.9994: slerp
    yield "antipodal", base, -base
    yield "zero-base", torch.zeros(shape), other             # zero norm: taken as 1


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 1.4])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_slerp_parity(shape, t):
    for case, base, other in _slerp_pairs(shape):
        assert_close(ours("slerp", base, [other], t=t), theirs("slerp", base, [other], t=t), what=case)


def test_slerp_parity_above_one_chunk():
    """Over 2²⁰ entries mergekit takes norms chunk by chunk; a single float32 reduction would differ by ~1e-5."""
    base, (other,) = rand((1100, 1000), 1, seed=13)
    assert_close(ours("slerp", base, [other], t=0.3), theirs("slerp", base, [other], t=0.3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_dtype_handling_matches_mergekit(dtype):
    """Work dtypes (float32 scratch for half inputs where mergekit uses it) and output dtypes are mergekit's."""
    base, models = rand((6, 5), 3, seed=1)
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    for name, bb, ms, p in [("ties", base, models, dict(weight=[1, .5, .3], density=.5)),
                            ("della", base, models, dict(weight=[1, .5, .3], density=.5, epsilon=.1)),
                            ("sce", base, models, dict(select_topk=.5)), ("model_stock", base, models, {}),
                            ("linear", None, models, dict(weight=[1, 2, 3])), ("slerp", base, models[:1], dict(t=.3)),
                            ("nuslerp", base, models[:2], dict(weight=[1, 2])), ("karcher", None, models, {}),
                            ("multislerp", base, models, dict(weight=[1, .5, .3]))]:
        assert_close(ours(name, bb, ms, seed=3, **p), theirs(name, bb, ms, seed=3, **p), what=name)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nuslerp_parity(shape, flatten, row_wise, with_base):
    base, models = rand(shape, 2, seed=6)
    base = base if with_base else None
    params = {"weight": [0.3, 0.9], "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    assert_close(ours("nuslerp", base, models, **params), theirs("nuslerp", base, models, **params))
    colinear = [models[0], -2 * models[0]] if base is None else [base + models[0], base - 2 * models[0]]
    assert_close(ours("nuslerp", base, colinear, **params), theirs("nuslerp", base, colinear, **params))


@pytest.mark.parametrize("normalize_weights", [True, False])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_multislerp_parity(shape, n, with_base, normalize_weights):
    base, models = rand(shape, n, seed=8)
    base = base if with_base else None
    params = {"weight": [0.5, 0.2, 0.9, 0.4][:n], "normalize_weights": normalize_weights}
    assert_close(ours("multislerp", base, models, **params), theirs("multislerp", base, models, **params))


def test_multislerp_antipodal_pair_falls_back_to_weighted_sum_like_mergekit():
    a = torch.randn(5, generator=torch.Generator().manual_seed(1))
    params = {"weight": [1.0, 1.0]}
    assert_close(ours("multislerp", None, [a, -a], **params), theirs("multislerp", None, [a, -a], **params))


@pytest.mark.parametrize("n", [2, 3, 8])
def test_multislerp_of_inputs_that_all_equal_the_base_is_the_base(n):
    """A tensor no fine-tune changed (every LoRA merge has many): mergekit 0.1.5 raises for n > 2 (zero mean
    direction); the only consistent answer is the base itself, unchanged."""
    base, _ = rand((4, 3), 1, seed=11)
    out = ours("multislerp", base, [base.clone() for _ in range(n)], weight=[1.0] * n)
    assert torch.equal(out, base)
    assert torch.equal(ours("multislerp", None, [torch.zeros(4, 3)] * n, weight=[1.0] * n), torch.zeros(4, 3))


@pytest.mark.parametrize("max_iter,tol", [(10, 1e-5), (2, 1e-5), (50, 1e-7)])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_karcher_parity(shape, n, max_iter, tol):
    _, models = rand(shape, n, seed=9)
    assert_close(ours("karcher", None, models, max_iter=max_iter, tol=tol),
                 theirs("karcher", None, models, max_iter=max_iter, tol=tol))


def test_karcher_parity_with_zero_inputs():
    _, (a, b) = rand((4, 3), 2, seed=10)
    z = torch.zeros(4, 3)
    assert_close(ours("karcher", None, [a, z, b]), theirs("karcher", None, [a, z, b]))
    assert_close(ours("karcher", None, [z, z]), theirs("karcher", None, [z, z]))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_passthrough_parity(scale):
    _, (a,) = rand((3, 4), 1)
    assert_close(ours("passthrough", None, [a], scale=[scale]), theirs("passthrough", None, [a], scale=[scale]))


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sparsify_functions_parity(shape, density, rescale):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(12))
    norm = mk_sparsify.RescaleNorm.l1 if rescale else None
    assert_close(sp.magnitude(x, density, rescale), mk_sparsify.magnitude(x, density, norm))
    for gamma in (0.0, 0.1, 0.5):
        assert_close(sp.magnitude_outliers(x, density, gamma, rescale),
                     mk_sparsify.magnitude_outliers(x, density, norm, gamma=gamma))
    with torch.random.fork_rng():
        torch.manual_seed(3)
        want = mk_sparsify.bernoulli(x, density, norm)
    assert_close(sp.random(x, density, rescale, torch.Generator().manual_seed(3)), want)
    if 0.1 < density < 0.9:
        with torch.random.fork_rng():
            torch.manual_seed(4)
            want = mk_sparsify.della_magprune(x, density, 0.1, norm)
        assert_close(sp.rank_magnitude_sampling(x, density, 0.1, rescale, torch.Generator().manual_seed(4)), want)


def test_ties_and_della_with_no_models_return_the_base_like_mergekit():
    base = torch.randn(3, 2)
    for name in ("ties", "della", "task_arithmetic", "sce"):
        assert_close(ours(name, base, [], **({} if name == "sce" else {"weight": []})), base)


# ---------------------------------------------------------------- 1b. random methods: statistics

N_STAT = 4000  # entries; enough that a 5-standard-error band is tight, small enough to run in milliseconds


def _draws(fn, x: Tensor, k: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([fn(x, g) for _ in range(k)])  # (k, *x.shape)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keeps_density_and_rescales_by_l1(density):
    x = torch.randn(N_STAT, generator=torch.Generator().manual_seed(0))
    out = sp.random(x, density, rescale=True, generator=torch.Generator().manual_seed(1))
    kept = out != 0
    se = math.sqrt(density * (1 - density) / N_STAT)
    assert abs(kept.float().mean().item() - density) < 5 * se
    factor = x.abs().sum() / x[kept].abs().sum()  # mergekit's L1 rescale ...
    torch.testing.assert_close(out[kept], x[kept] * factor)
    assert abs(factor.item() * density - 1) < 0.1  # ... is the paper's 1/(1 - p) up to sampling noise
    unscaled = sp.random(x, density, rescale=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(unscaled, x * kept)  # same draw, survivors unscaled


def test_dare_is_unbiased_over_many_draws():
    x = torch.randn(200, generator=torch.Generator().manual_seed(2)) * 2
    density, k = 0.3, 2000
    draws = _draws(lambda t, g: sp.random(t, density, rescale=True, generator=g), x, k)
    se = x.abs() * math.sqrt((1 - density) / density) / math.sqrt(k)  # per-entry standard error of the mean
    z = (draws.mean(0) - x).abs() / se
    assert z.max().item() < 5, z.max().item()


def test_random_methods_are_deterministic_for_a_fixed_generator():
    base, models = rand((8, 8), 3, seed=1)
    for name, extra in [("dare_ties", {}), ("dare_linear", {}), ("della", {"epsilon": 0.1})]:
        params = dict(weight=[1.0, 1.0, 1.0], density=0.4, **extra)
        a = ours(name, base, models, seed=5, **params)
        assert torch.equal(a, ours(name, base, models, seed=5, **params)), name
        assert not torch.equal(a, ours(name, base, models, seed=6, **params)), name


def test_della_keep_probability_rises_with_magnitude_rank():
    """MAGPRUNE: p_i = density − ε + 2ε·rank_i/(n−1); the smallest entry is kept least often, the largest most."""
    n, density, eps, k = 201, 0.5, 0.3, 1500
    x = torch.linspace(0.1, 2.0, n) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)  # magnitude rank = index
    kept = _draws(lambda t, g: sp.rank_magnitude_sampling(t, density, eps, False, g), x, k) != 0  # (k, n)
    freq = kept.float().mean(0)
    p = density - eps + 2 * eps * torch.arange(n) / (n - 1)
    se = (p * (1 - p) / k).sqrt()
    assert ((freq - p).abs() / se).max().item() < 5
    assert abs(kept.float().mean().item() - density) < 0.01
    # Without rescale the mean is p_i·x_i, unbiased for the *pruned* expectation:
    draws = _draws(lambda t, g: sp.rank_magnitude_sampling(t, density, eps, False, g), x, k, seed=1)
    se_mean = x.abs() * (p * (1 - p)).sqrt() / math.sqrt(k)
    assert ((draws.mean(0) - p * x).abs() / se_mean).max().item() < 5
    # With rescale every draw keeps the L1 norm exactly (mergekit's rescale; the paper's is 1/p_i per entry).
    scaled = sp.rank_magnitude_sampling(x, density, eps, True, torch.Generator().manual_seed(3))
    torch.testing.assert_close(scaled.abs().sum(), x.abs().sum())


def test_della_ranks_within_rows_of_a_matrix():
    x = torch.stack([torch.linspace(0.1, 1, 50), 100 * torch.linspace(0.1, 1, 50)])  # row 2 ≫ row 1
    kept = _draws(lambda t, g: sp.rank_magnitude_sampling(t, 0.5, 0.4, False, g), x, 400) != 0
    freq = kept.float().mean(0)  # (2, 50): both rows follow the same rank ramp despite the 100x scale
    assert (freq[0] - freq[1]).abs().mean().item() < 0.05
    assert freq[:, :5].mean() < 0.25 and freq[:, -5:].mean() > 0.75


# ---------------------------------------------------------------- 2. constructed cases

D1, D2, D3 = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([2.0, -1.0, -2.0]), torch.tensor([-0.5, -3.0, 4.0])


def delta(name: str, deltas: list[Tensor], **params) -> Tensor:
    base = torch.zeros_like(deltas[0])
    return get_merge_method(name).fn(base, deltas, ctx=TensorContext(name="w"), **params)


def test_ties_sign_election_by_mass_and_disjoint_mean():
    # entry 0: mass +2.5 → +, mean of {1, 2}; entry 1: mass −2 → −, mean of {−1, −3}; entry 2: mass +1 → only 4.
    got = delta("ties", [D1, D2, D3], weight=[1, 1, 1], density=1.0)
    torch.testing.assert_close(got, torch.tensor([1.5, -2.0, 4.0]))


def test_count_consensus_elects_the_sign_most_models_hold():
    # entry 2: two models say − (−1, −2), one says + (4, larger mass): count elects −, sum elects +.
    got = delta("generalized_task_arithmetic", [D1, D2, D3], weight=[1, 1, 1], consensus="count", normalize=True)
    torch.testing.assert_close(got, torch.tensor([1.5, -2.0, -1.5]))


def test_ties_trims_before_electing():
    a, b, c = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([1.5, -1.0, -2.0]), torch.tensor([-0.5, -3.0, 4.0])
    torch.testing.assert_close(delta("ties", [a, b, c], weight=[1, 1, 1]), torch.tensor([1.25, -2.0, 4.0]))
    # density 1/3 keeps one entry per delta: a → [0, 2, 0], b → [0, 0, −2], c → [0, 0, 4]. Untrimmed, entry 1 was
    # elected − (mass −2); trimmed, only a's +2 is left there; entry 2: mass +2 → c's 4.
    got = delta("ties", [a, b, c], weight=[1, 1, 1], density=1 / 3 + 1e-6)
    torch.testing.assert_close(got, torch.tensor([0.0, 2.0, 4.0]))


def test_magnitude_keeps_the_top_k():
    x = torch.tensor([0.1, -5.0, 3.0, 0.2, -0.05, 4.0])
    torch.testing.assert_close(sp.magnitude(x, 0.5), torch.tensor([0.0, -5.0, 3.0, 0.0, 0.0, 4.0]))
    torch.testing.assert_close(sp.magnitude(x, 0.5, rescale=True),
                               torch.tensor([0.0, -5.0, 3.0, 0.0, 0.0, 4.0]) * (12.35 / 12.0))
    torch.testing.assert_close(sp.magnitude(x, 0.01), torch.tensor([0.0, -5.0, 0, 0, 0, 0]))  # keeps ≥ 1


def test_breadcrumbs_drops_smallest_and_largest():
    x = torch.arange(1.0, 11.0) * torch.tensor([1.0, -1.0] * 5)  # magnitudes 1..10
    got = sp.magnitude_outliers(x, density=0.5, gamma=0.2)  # keep 5, drop the top 2 and the bottom 3
    want = x * ((x.abs() >= 4) & (x.abs() <= 8))
    torch.testing.assert_close(got, want)
    # density + gamma > 1: nothing small is dropped, and the outlier cut shrinks to n − keep = 1 to keep the density
    torch.testing.assert_close(sp.magnitude_outliers(x, density=0.9, gamma=0.2), x * (x.abs() <= 9))


def test_normalize_and_lambda_semantics():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    torch.testing.assert_close(delta("task_arithmetic", [a, b], weight=[1, 1]), a + b)
    torch.testing.assert_close(delta("task_arithmetic", [a, b], weight=[1, 3], normalize=True), (a + 3 * b) / 4)
    torch.testing.assert_close(delta("task_arithmetic", [a, b], weight=[1, 1], **{"lambda": 0.5}), (a + b) / 2)
    # weights summing to ~0 are not divided by (mergekit: divisor → 1 when |Σw| < 1e-8)
    torch.testing.assert_close(delta("task_arithmetic", [a, b], weight=[1, -1], normalize=True), a - b)
    ms = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    torch.testing.assert_close(get_merge_method("linear").fn(None, ms, weight=[1, 3]), torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(get_merge_method("linear").fn(None, ms, weight=[1, 3], normalize=False),
                               torch.tensor([10.0, 20.0]))


def test_sce_selects_high_variance_entries_and_weights_by_energy():
    a, b = torch.tensor([1.0, 1.0, 0.0, 2.0]), torch.tensor([1.0, -1.0, 0.0, 0.0])
    # variances: [0, 1, 0, 1] → nonzero 2, select_topk 0.5 keeps one of entries 1 and 3 (the first topk index)
    # energies mean(τ²) = 1.5 and 0.5 → weights ¾, ¼. Entry 0: both agree → (¾·1 + ¼·1)/1 = 1. Entry 1: the sum
    # of deltas is 0 → + wins the tie → only a agrees → 1. Entry 2: nobody holds it → 0. Entry 3: only a → 2.
    torch.testing.assert_close(delta("sce", [a, b]), torch.tensor([1.0, 1.0, 0.0, 2.0]))
    b2 = torch.tensor([3.0, -1.0, 0.0, 0.0])  # entry 0: (¾·1 + w_b·3)/(¾ + w_b) with the new energy weights
    wa, wb = 1.5 / (1.5 + 2.5), 2.5 / (1.5 + 2.5)
    torch.testing.assert_close(delta("sce", [a, b2])[0], torch.tensor((wa * 1 + wb * 3) / (wa + wb)))
    sel = delta("sce", [a, b], select_topk=0.5)
    assert (sel[[0, 2]] == 0).all() and (sel[[1, 3]] != 0).sum() == 1


def test_model_stock_ratio_from_the_angle():
    base = torch.tensor([1.0, -1.0])
    phi = math.pi / 3  # cos = 1/2, k = 2 → t = 2·½ / (1 + ½) = 2/3
    m1, m2 = base + torch.tensor([1.0, 0.0]), base + 2 * torch.tensor([math.cos(phi), math.sin(phi)])
    t = 2 / 3
    got = get_merge_method("model_stock").fn(base, [m1, m2])
    torch.testing.assert_close(got, t * (m1 + m2) / 2 + (1 - t) * base)
    # orthogonal offsets: t = 0, the base; identical offsets: t = 1, the average
    torch.testing.assert_close(get_merge_method("model_stock").fn(base, [base + torch.tensor([1.0, 0]),
                                                                          base + torch.tensor([0, 3.0])]), base)
    torch.testing.assert_close(get_merge_method("model_stock").fn(base, [m1, m1.clone()]), m1)
    # three models, pairwise cos ½ → t = 3·½ / (1 + 2·½) = 3/4
    e = torch.eye(3)
    ms = [e[0] + e[1], e[1] + e[2], e[0] + e[2]]  # pairwise cos = 1/2
    torch.testing.assert_close(get_merge_method("model_stock").fn(torch.zeros(3), ms), 0.75 * sum(ms) / 3)


def test_model_stock_filter_wise_gives_one_ratio_per_row():
    base = torch.zeros(2, 2)
    m1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    m2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # row 0 orthogonal (t=0), row 1 identical (t=1)
    got = get_merge_method("model_stock").fn(base, [m1, m2], filter_wise=True)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))


def test_slerp_endpoints_and_sphere():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    a, b = a / a.norm(), b / b.norm()
    fn = get_merge_method("slerp").fn
    torch.testing.assert_close(fn(a, [b], t=0.0), a)
    torch.testing.assert_close(fn(a, [b], t=1.0), b)
    omega = torch.acos(a @ b)
    for t in (0.1, 0.25, 0.5, 0.9):
        out = fn(a, [b], t=t)
        assert abs(out.norm().item() - 1) < 1e-5  # stays on the unit sphere (lerp would shrink it)
        torch.testing.assert_close(torch.acos((out @ a).clamp(-1, 1)), t * omega)  # constant angular speed
    mid_lerp = (a + b) / 2
    assert mid_lerp.norm() < fn(a, [b], t=0.5).norm()
    # colinear: plain lerp
    torch.testing.assert_close(fn(a, [3 * a], t=0.5), 2 * a)


def test_nuslerp_is_slerp_at_relative_weight():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    got = get_merge_method("nuslerp").fn(None, [a, b], weight=[1.0, 3.0])
    torch.testing.assert_close(got, get_merge_method("slerp").fn(a, [b], t=0.75))


def test_multislerp_of_two_is_the_slerp_midpoint():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    got = get_merge_method("multislerp").fn(None, [a, b], weight=[1.0, 1.0])
    # direction halfway between (45°), norm the mean of the norms (1.5)
    torch.testing.assert_close(got, 1.5 * torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2), atol=1e-6, rtol=0)


def test_karcher_of_identical_tensors_is_that_tensor_and_of_two_is_the_geodesic_midpoint():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    fn = get_merge_method("karcher").fn
    torch.testing.assert_close(fn(None, [x, x.clone(), x.clone()]), x)
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    torch.testing.assert_close(fn(None, [a, b]), 3.0 * torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_nearswap_formula():
    a = torch.tensor([0.0, 0.0, 0.0, 1.0])
    b = torch.tensor([0.05, 0.5, -2.0, 1.0])
    # w = clamp(t/|a−b|, 0, 1) = [1, 0.2, 0.05, 1] → w·b + (1−w)·a
    got = get_merge_method("nearswap").fn(a, [b], t=0.1)
    torch.testing.assert_close(got, torch.tensor([0.05, 0.1, -0.1, 1.0]))


def test_passthrough_returns_its_input_and_refuses_two():
    x = torch.randn(2, 3)
    fn = get_merge_method("passthrough").fn
    assert fn(None, [x]) is x
    torch.testing.assert_close(fn(None, [x], scale=[2.0]), 2 * x)
    with pytest.raises(SpliceError, match="exactly 1"):
        fn(None, [x, x])


# ---------------------------------------------------------------- errors: one line naming the parameter

@pytest.mark.parametrize("call,match", [
    (lambda: delta("ties", [D1, D2], weight=[1, 1], density=1.5), "'density'"),
    (lambda: delta("ties", [D1, D2], weight=[1, 1, 1]), "'weight' has 3 values for 2 models"),
    (lambda: delta("ties", [D1, D2]), "'weight' is required"),
    (lambda: delta("ties", [D1, D2], weight=[1, 1], densty=0.5), "did you mean 'density'"),
    (lambda: delta("ties", [D1, D2], weight=[1, 1], gamma=0.1), "unknown parameter 'gamma'"),
    (lambda: delta("della", [D1, D2], weight=[1, 1], density=0.5, epsilon=0.6), "'epsilon'"),
    (lambda: delta("breadcrumbs", [D1, D2], weight=[1, 1], gamma=-0.1), "'gamma'"),
    (lambda: delta("generalized_task_arithmetic", [D1], weight=1, sparsify="topk"), "'sparsify'"),
    (lambda: delta("generalized_task_arithmetic", [D1], weight=1, consensus="vote"), "'consensus'"),
    (lambda: delta("sce", [D1, D2], select_topk=2.0), "'select_topk'"),
    (lambda: get_merge_method("linear").fn(None, [D1, D2], weight=[1, -1]), "'weight' sums to 0"),
    (lambda: get_merge_method("slerp").fn(D1, [D2, D3], t=0.5), "exactly 1"),
    (lambda: get_merge_method("slerp").fn(None, [D2], t=0.5), "needs a base"),
    (lambda: get_merge_method("nearswap").fn(D1, [D2, D3], t=0.5), "exactly 1"),
    (lambda: get_merge_method("model_stock").fn(D1, [D2]), "at least 2"),
    (lambda: get_merge_method("nuslerp").fn(None, [D1, D2, D3], weight=[1, 1, 1]), "exactly 2"),
    (lambda: get_merge_method("karcher").fn(None, [D1, D2], max_iter=-1), "'max_iter'"),
    (lambda: get_merge_method("linear").fn(None, [D1, torch.zeros(4)], weight=[1, 1]), "different shapes"),
    (lambda: get_merge_method("multislerp").fn(None, [D1, -D1, D1.clone()], weight=[2, 1, -1]), "'weight'"),
])
def test_bad_parameters_raise_one_line_splice_errors(call, match):
    with pytest.raises(SpliceError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- 3. the registry

EXPECTED = {  # name: (space, needs_base)
    "linear": ("weights", False), "task_arithmetic": ("delta", True), "ties": ("delta", True),
    "dare_linear": ("delta", True), "dare_ties": ("delta", True), "breadcrumbs": ("delta", True),
    "breadcrumbs_ties": ("delta", True), "della": ("delta", True), "della_linear": ("delta", True),
    "generalized_task_arithmetic": ("delta", True), "sce": ("delta", True), "model_stock": ("weights", True),
    "nearswap": ("weights", True), "passthrough": ("weights", False), "slerp": ("weights", True),
    "nuslerp": ("weights", False), "multislerp": ("weights", False), "karcher": ("weights", False),
}


def test_registered_names_spaces_and_base_needs():
    assert set(EXPECTED) <= set(merge_method_names())
    for name, (space, needs_base) in EXPECTED.items():
        m = get_merge_method(name)
        assert (m.space, m.needs_base) == (space, needs_base), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_docstrings_links_and_param_defaults(name):
    m = get_merge_method(name)
    assert m.fn.__doc__ and "http" in m.fn.__doc__, name
    assert m.reference.startswith("http"), name
    module_doc = inspect.getmodule(m.fn).__doc__
    assert module_doc and "http" in module_doc and ("=" in module_doc), name  # the link and the equation
    signature = inspect.signature(m.fn)
    for pname, p in {**m.params, **m.model_params}.items():
        assert p.help, (name, pname)
        if p.required:
            assert p.default is None, (name, pname)
        else:
            assert p.default is not None and isinstance(p.default, p.kind) or (
                p.kind is float and isinstance(p.default, int)), (name, pname, p.default)
        if pname in signature.parameters:  # an explicit keyword: its Python default is the schema's
            py_default = signature.parameters[pname].default
            if p.required:
                assert py_default is inspect.Parameter.empty, (name, pname)
            else:
                assert py_default == p.default, (name, pname, py_default, p.default)


# mergekit's defaults that we change on purpose: passthrough's "no scale" is None there and 1.0 here.
MK_DEFAULT_EXCEPTIONS = {("passthrough", "scale")}


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n != "generalized_task_arithmetic"))
def test_parameters_and_defaults_match_mergekit(name):
    spec = mk_registry.get(name).spec
    theirs_ = {p.name: p for p in spec.parameters}
    m = get_merge_method(name)
    mine = {**m.params, **m.model_params}
    assert set(mine) == set(theirs_), name
    for pname, p in mine.items():
        ref = theirs_[pname]
        assert p.required == ref.required, (name, pname)
        if not p.required and (name, pname) not in MK_DEFAULT_EXCEPTIONS:
            assert p.default == ref.default, (name, pname, p.default, ref.default)
        assert (pname in m.model_params) == (ref.scope.value != "shared"), (name, pname)
