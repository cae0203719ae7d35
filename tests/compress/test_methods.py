"""Each compression method's defining property, on constructed tensors."""
from __future__ import annotations

import math

import pytest
import torch

from splice.compress import Packed, compress
from splice.compress.codec import quantize
from splice.delta.forms import Dense, LowRank, Scale, Sparse
from splice.errors import SpliceError


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def low_rank(m, n, r, seed=0):
    return randn(m, r, seed=seed) @ randn(r, n, seed=seed + 1)


# -- sparsifiers ------------------------------------------------------------------------------------------------
def test_dare_keeps_the_expected_fraction_with_an_unbiased_mean():
    n, density, c = 200_000, 0.1, 0.01
    out, _ = compress(Dense(torch.full((400, n // 400), c)), "dare", density=density, seed=3)
    kept = out.parts["w"]
    # Binomial(n, 0.1): sd = sqrt(n·0.1·0.9) ≈ 134; allow 5 sd.
    assert abs(kept.nnz - density * n) < 5 * math.sqrt(n * density * (1 - density))
    torch.testing.assert_close(kept.values, torch.full((kept.nnz,), c / density))  # rescaled by 1/(1 − p)
    # E[Δ̃_i] = Δ_i: the mean over all entries has sd c·sqrt((1 − d)/d / n) ≈ 6.7e-5; allow 5 sd.
    mean = float(out.materialize().mean())
    assert abs(mean - c) < 5 * c * math.sqrt((1 - density) / density / n)


def test_dare_is_reproducible_per_seed_and_tensor_name():
    d = Dense(randn(50, 40))
    a, _ = compress(d, "dare", density=0.3, seed=1)
    b, _ = compress(d, "dare", density=0.3, seed=1)
    c, _ = compress(d, "dare", density=0.3, seed=2)
    assert torch.equal(a.materialize(), b.materialize()) and not torch.equal(a.materialize(), c.materialize())


def test_darex_fixed_q_rescales_survivors_by_one_over_q():
    t = randn(60, 30)
    out, _ = compress(Dense(t), "darex", density=0.2, q=0.5)
    w = out.parts["w"]
    torch.testing.assert_close(w.values, t.reshape(-1)[w.index] / 0.5)


def test_darex_default_q_lies_between_dare_and_no_rescale():
    t = randn(60, 30)
    out, _ = compress(Dense(t), "darex", density=0.2)
    w = out.parts["w"]
    factor = (w.values / t.reshape(-1)[w.index]).unique()
    assert factor.numel() == 1 or torch.allclose(factor, factor[:1].expand_as(factor))
    assert 1.0 - 1e-6 <= float(factor[0]) <= 1 / 0.2 + 1e-5


def test_magnitude_keeps_exactly_the_largest_entries():
    t = randn(40, 25)
    out, _ = compress(Dense(t), "magnitude", density=0.1)
    w = out.parts["w"]
    k = int(0.1 * t.numel())
    assert w.nnz == k
    assert set(w.index.tolist()) == set(t.abs().reshape(-1).topk(k).indices.tolist())
    torch.testing.assert_close(w.values, t.reshape(-1)[w.index])


def test_compeft_is_ternary_sign_times_one_scale():
    t = randn(64, 32)
    out, _ = compress(Dense(t), "compeft", density=0.2)
    d = out.materialize()
    k = int(0.2 * t.numel())
    top = t.abs().reshape(-1).topk(k).indices
    alpha = float(t.reshape(-1)[top].abs().mean())
    levels = d.abs().unique().tolist()
    assert len(levels) == 2 and levels[0] == 0.0 and levels[1] == pytest.approx(alpha, rel=1e-6)
    assert int((d != 0).sum()) == k
    assert torch.equal(d.reshape(-1)[top].sign(), t.reshape(-1)[top].sign())
    # 1 sign bit per kept entry + one float32 scale + positions (k int32 or an n-bit mask, the smaller)
    assert out.nbytes == math.ceil(k / 8) + 4 + min(4 * k, math.ceil(t.numel() / 8))
    scaled, _ = compress(Dense(t), "compeft", density=0.2, alpha=2.0)
    assert float(scaled.materialize().abs().max()) == pytest.approx(2.0 * float(t.std()), rel=1e-6)


# -- quantization -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("group_size", [0, 64])
def test_quantize_error_within_the_bound_of_the_bit_width(bits, group_size):
    x = randn(1000) * torch.linspace(0.1, 3, 1000)  # groups with different ranges
    q = quantize(x, bits, group_size)
    err = (q.dequantize() - x).abs()
    g = group_size or x.numel()
    qmax = 2 ** (bits - 1) - 1
    for start in range(0, x.numel(), g):
        s = float(x[start:start + g].abs().max()) / qmax  # step of the group
        assert float(err[start:start + g].max()) <= s / 2 * (1 + 1e-5)
    assert q.nbytes == bits * math.ceil(x.numel() / 8) + 4 * math.ceil(x.numel() / g)


def test_one_bit_is_sign_times_the_l2_optimal_scale():
    x = randn(300)
    q = quantize(x, 1, 100)
    y = q.dequantize()
    for start in range(0, 300, 100):
        part, got = x[start:start + 100], y[start:start + 100]
        s = float(part.abs().mean())
        torch.testing.assert_close(got, torch.where(part >= 0, s, -s))
        # s = mean|x| minimises ‖x − s·sign(x)‖: the error is ‖x‖² − n·s²
        assert float((part - got).pow(2).sum()) == pytest.approx(float(part.pow(2).sum()) - 100 * s * s, rel=1e-4)
    assert q.nbytes == math.ceil(300 / 8) + 3 * 4


def test_quantize_a_lora_quantizes_both_factors():
    lr = LowRank(randn(40, 4), randn(4, 30, seed=1), scale=2.0)
    out, report = compress(lr, "quantize", bits=8, group_size=0)
    assert out.kind == "lowrank" and all(p.quantized for p in out.parts.values())
    assert report.tensors[0].bytes_before == lr.nbytes
    assert report.tensors[0].rel_error < 0.02


# -- low rank ---------------------------------------------------------------------------------------------------
def test_svd_extracts_a_rank_r_matrix_exactly():
    t = low_rank(80, 60, 5)
    out, report = compress(Dense(t), "svd", rank=5)
    assert out.kind == "lowrank" and out.rank == 5
    assert report.tensors[0].rel_error < 1e-5


def test_svd_truncation_error_equals_the_dropped_singular_values():
    t = randn(70, 50)
    s = torch.linalg.svdvals(t.double())
    for r in (1, 7, 20):
        out, report = compress(Dense(t), "svd", rank=r)
        want = float(s[r:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        assert report.tensors[0].rel_error == pytest.approx(want, rel=1e-5)


def test_svd_energy_picks_the_fewest_singular_values():
    t = randn(200, 150) @ torch.diag(torch.logspace(0, -2, 150)) @ randn(150, 150, seed=1)
    s = torch.linalg.svdvals(t.double()).pow(2)
    share = s.cumsum(0) / s.sum()
    out, _ = compress(Dense(t), "svd", energy=0.9)
    r = out.rank
    assert share[r - 1] >= 0.9 and (r == 1 or share[r - 2] < 0.9)


def test_svd_of_a_lora_retruncates_from_its_factors():
    lr = LowRank(randn(50, 6), randn(6, 40, seed=1), scale=0.5)
    s = torch.linalg.svdvals(lr.materialize().double())
    out, report = compress(lr, "svd", rank=3)
    assert out.rank == 3
    assert report.tensors[0].rel_error == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-5)


def test_svd_leaves_vectors_and_too_small_matrices_alone():
    from splice.delta.deltaset import DeltaSet

    ds = DeltaSet({"w": Dense(randn(64, 64)), "b": Dense(randn(64)), "tiny": Dense(randn(2, 64))})
    out, _ = compress(ds, "svd", rank=4)
    assert out["w"].kind == "lowrank" and out["b"].kind == "dense" and out["tiny"].kind == "dense"


def test_svd_rank_larger_than_every_tensor_allows_is_an_error():
    with pytest.raises(SpliceError, match="rank 40"):
        compress(Dense(randn(20, 30)), "svd", rank=40)


def test_delta_come_gives_more_bits_to_larger_singular_values():
    t = randn(128, 96) @ torch.diag(torch.logspace(0, -2, 96)) @ randn(96, 96, seed=1)
    out, _ = compress(Dense(t), "delta_come", block_bits="8,4,2", block_ranks="2,10", group_size=32)
    bits = [out.parts[f"A.{i}"].values.bits for i in out.blocks]
    ranks = [out.parts[f"A.{i}"].shape[0] for i in out.blocks]
    assert bits == [8, 4, 2] and ranks == [2, 10, 84]
    # mixed precision beats uniform 2-bit factors of the same rank
    uniform, _ = compress(Dense(t), "delta_come", block_bits="2,2,2", block_ranks="2,10", group_size=32)
    err = lambda d: float((d.materialize() - t).norm() / t.norm())  # noqa: E731
    assert err(out) < err(uniform)


def test_a_group_longer_than_the_tensor_is_one_group_without_padding_to_its_length():
    x = randn(64)
    huge = quantize(x, 4, group_size=2**40)  # padding to the group length allocated 4 TB; now one group of 64
    assert torch.equal(huge.dequantize(), quantize(x, 4, group_size=0).dequantize())


def test_compeft_with_a_numeric_alpha_keeps_a_one_entry_tensor_finite():
    out, _ = compress(Dense(torch.tensor([0.5])), "compeft", density=1.0, alpha="2")  # std of one value: NaN
    assert torch.isfinite(out.materialize()).all() and float(out.materialize()) == 0.5


def test_delta_come_stores_an_unchanged_matrix_as_rank_zero():
    # energy picks rank 0 for an all-zero delta (a frozen embedding of a full fine-tune); it raised "needs parts".
    out, _ = compress(Dense(torch.zeros(32, 16)), "delta_come", energy=0.9, group_size=32)
    assert out.kind == "lowrank" and not out.materialize().any() and out.materialize().shape == (32, 16)


# -- composition and errors -------------------------------------------------------------------------------------
def test_composed_methods_equal_the_steps_one_after_the_other():
    t = randn(64, 48)
    both, report = compress(Dense(t), "dare,quantize", density=0.25, bits=4, group_size=32, seed=5)
    dropped, _ = compress(Dense(t), "dare", density=0.25, seed=5)
    w = both.parts["w"]
    assert torch.equal(w.index, dropped.parts["w"].index) and w.quantized
    want = quantize(dropped.parts["w"].values, 4, 32).dequantize()
    torch.testing.assert_close(w.plain_values(), want)
    assert report.tensors[0].bytes_after == both.nbytes < dropped.nbytes
    lowq, _ = compress(Dense(low_rank(64, 48, 3)), "svd,quantize", rank=3, bits=8)
    assert lowq.kind == "lowrank" and all(p.quantized for p in lowq.parts.values())


@pytest.mark.parametrize("methods, params, match", [
    ("quantize,dare", {}, "cannot follow"),
    ("dare,magnitude", {}, "cannot follow"),
    ("compeft,quantize", {}, "cannot follow"),
    ("dara", {}, "did you mean 'dare'"),
    ("dare", {"bits": 4}, "'bits' is not used"),
    ("dare", {"density": 1.5}, "density must be in"),
    ("quantize", {"bits": 9}, "bits must be in 1..8"),
    ("svd", {}, "give rank or energy"),
    ("", {}, "at least one"),
])
def test_bad_method_chains_and_params_are_one_line_errors(methods, params, match):
    with pytest.raises(SpliceError, match=match) as info:
        compress(Dense(randn(8, 8)), methods, **params)
    assert "\n" not in str(info.value)


def test_a_multiplicative_delta_is_refused():
    with pytest.raises(SpliceError, match="multiplicative"):
        compress(Scale(torch.ones(4), 0, (4, 3)), "quantize")


def test_sparse_input_is_coalesced_and_compressed():
    sp = Sparse(torch.tensor([3, 1, 3]), torch.tensor([1.0, 2.0, 4.0]), (2, 4))
    out, report = compress(sp, "quantize", bits=8, group_size=0)
    assert isinstance(out, Packed) and out.parts["w"].index.tolist() == [1, 3]
    torch.testing.assert_close(out.materialize(), sp.materialize(), atol=5 / 127 / 2, rtol=0)
