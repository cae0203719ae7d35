import pytest
import torch

from splice.delta import FORMS, Delta, Dense, Kron, LowRank, Scale, Sparse
from splice.errors import SpliceError


def _check_apply(form, weight, scale, base=None):
    expected = weight + scale * form.materialize(weight if base is None else base)
    w = weight.clone()
    out = form.apply_to(w, scale)
    assert out is w  # in place
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)


def test_dense():
    t = torch.randn(4, 3)
    d = Dense(t)
    assert d.shape == (4, 3) and d.numel_stored == 12 and d.nbytes == 48
    assert torch.equal(d.materialize(), t)
    _check_apply(d, torch.randn(4, 3), 0.5)


def test_lowrank_math_and_apply():
    B, A = torch.randn(6, 2), torch.randn(2, 5)
    d = LowRank(B, A, scale=0.25)
    assert d.shape == (6, 5) and d.rank == 2 and d.numel_stored == 22 and d.nbytes == 88
    torch.testing.assert_close(d.materialize(), 0.25 * B @ A)
    _check_apply(d, torch.randn(6, 5), 2.0)


def test_lowrank_conv_shape():
    B, A = torch.randn(8, 3), torch.randn(3, 4 * 3 * 3)
    d = LowRank(B, A, scale=0.5, shape=(8, 4, 3, 3))
    assert d.shape == torch.Size((8, 4, 3, 3))
    torch.testing.assert_close(d.materialize(), (0.5 * B @ A).reshape(8, 4, 3, 3))
    _check_apply(d, torch.randn(8, 4, 3, 3), -1.0)
    with pytest.raises(SpliceError, match=r"shape \(8, 4, 3, 4\)"):
        LowRank(B, A, shape=(8, 4, 3, 4))


def test_lowrank_non_contiguous_weight_falls_back():
    d = LowRank(torch.randn(5, 2), torch.randn(2, 4))
    w = torch.randn(4, 5).t()
    expected = w + d.materialize()
    d.apply_to(w)
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)


def test_kron_math_and_apply():
    A, B = torch.randn(2, 3), torch.randn(4, 5)
    d = Kron(A, B, scale=0.5)
    assert d.shape == (8, 15) and d.numel_stored == 26 and d.nbytes == 104
    expected = torch.zeros(8, 15)
    for i in range(2):  # the definition, block by block: block (i, j) is A[i, j] · B
        for j in range(3):
            expected[4 * i:4 * i + 4, 5 * j:5 * j + 5] = 0.5 * A[i, j] * B
    torch.testing.assert_close(d.materialize(), expected)
    _check_apply(d, torch.randn(8, 15), -2.0)
    w = torch.randn(15, 8).t()  # a non-contiguous weight takes the dense path
    _check_apply(d, w, 1.0)


def test_kron_conv_shape():
    A, B = torch.randn(2, 2), torch.randn(3, 4 * 3 * 3)  # B: the (3, 4, 3, 3) kernel factor, flattened
    d = Kron(A, B, scale=2.0, shape=(6, 8, 3, 3))
    kernel = torch.kron(A[:, :, None, None], B.reshape(3, 4, 3, 3))  # torch's 4-D Kronecker product
    torch.testing.assert_close(d.materialize(), 2.0 * kernel)
    _check_apply(d, torch.randn(6, 8, 3, 3), 1.0)
    with pytest.raises(SpliceError, match=r"shape \(6, 8, 3, 4\)"):
        Kron(A, B, shape=(6, 8, 3, 4))
    with pytest.raises(SpliceError, match="matrices"):
        Kron(A, B.reshape(3, 4, 3, 3))


def test_sparse():
    index = torch.tensor([0, 5, 5, 11])
    values = torch.tensor([1.0, 2.0, 3.0, -4.0])
    d = Sparse(index, values, (3, 4))
    dense = torch.zeros(12)
    dense[0], dense[5], dense[11] = 1.0, 5.0, -4.0  # repeated indices add up
    assert torch.equal(d.materialize(), dense.view(3, 4))
    assert d.numel_stored == 8 and d.nbytes == 4 * 8 + 4 * 4
    _check_apply(d, torch.randn(3, 4), 0.5)
    w = torch.randn(4, 3).t()  # non-contiguous
    expected = w + 0.5 * d.materialize()
    d.apply_to(w, 0.5)
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)
    with pytest.raises(SpliceError, match="out of range"):
        Sparse(torch.tensor([12]), torch.tensor([1.0]), (3, 4))


def test_scale_is_multiplicative_and_needs_base():
    v = torch.rand(4) + 0.5
    d = Scale(v, axis=1, shape=(3, 4))
    base = torch.randn(3, 4)
    torch.testing.assert_close(d.materialize(base), base * (v - 1))
    w = base.clone()
    d.apply_to(w)
    torch.testing.assert_close(w, base * v, atol=1e-6, rtol=0)  # W_ft = W * v
    _check_apply(d, base, 0.3)
    with pytest.raises(SpliceError, match="needs the base"):
        d.materialize()
    assert d.numel_stored == 4 and d.nbytes == 16
    assert Scale(torch.ones(3), axis=-2, shape=(3, 4)).axis == 0
    with pytest.raises(SpliceError, match="axis"):
        Scale(torch.ones(3), axis=1, shape=(3, 4))


def test_shape_mismatch_names_both_shapes():
    for form in (Dense(torch.zeros(2, 3)), LowRank(torch.zeros(2, 1), torch.zeros(1, 3)),
                 Sparse(torch.tensor([0]), torch.tensor([1.0]), (2, 3)), Scale(torch.ones(3), 1, (2, 3)),
                 Kron(torch.zeros(1, 3), torch.zeros(2, 1))):
        with pytest.raises(SpliceError, match=r"\(2, 3\).*\(3, 2\)"):
            form.apply_to(torch.zeros(3, 2))


def test_to_and_protocol():
    forms = [Dense(torch.randn(2, 3)), LowRank(torch.randn(2, 1), torch.randn(1, 3), 2.0),
             Sparse(torch.tensor([1]), torch.tensor([1.0]), (2, 3)), Scale(torch.rand(3), 1, (2, 3)),
             Kron(torch.randn(1, 3), torch.randn(2, 1), 0.5)]
    base = torch.randn(2, 3)
    for form in forms:
        assert isinstance(form, Delta)
        assert type(form) in FORMS.values()
        half = form.to(dtype=torch.float64)
        assert type(half) is type(form) and half.shape == form.shape
        assert half.nbytes > form.nbytes or isinstance(form, Sparse)
        torch.testing.assert_close(half.materialize(base.double()).float(), form.materialize(base))
    assert forms[2].to(dtype=torch.float16).index.dtype == torch.long


def test_bf16_weight_gets_one_rounding():
    w = torch.randn(8, 8).bfloat16()
    d = LowRank(torch.randn(8, 2), torch.randn(2, 8))
    expected = (w.float() + d.materialize()).bfloat16()
    d.apply_to(w)
    assert torch.equal(w, expected)  # rounded once, not three times (22 of 64 entries differed before)
