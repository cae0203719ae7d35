"""The selection behind TIES / breadcrumbs trimming: exactly k kept, never a smaller magnitude over a larger one."""
from __future__ import annotations

import torch

from splice.merge.methods.sparsify import largest_mask, magnitude, magnitude_outliers


def tied_values(n: int = 100_000) -> torch.Tensor:
    # bfloat16 deltas tie constantly: this is the case where the choice at the cut matters.
    return (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.002).to(torch.bfloat16).float().abs()


def test_largest_mask_keeps_exactly_k_and_breaks_ties_by_index():
    v = tied_values()
    for k in (1, 17, 50_000, 99_999):
        m = largest_mask(v, k)
        assert int(m.sum()) == k
        assert v[m == 1].min() >= v[m == 0].max()
        cut = v[m == 1].min()
        tied = (v == cut).nonzero().squeeze(1)
        kept = tied[m[tied] == 1]
        assert torch.equal(kept, tied[: len(kept)])  # the first tied entries by index
    assert int(largest_mask(v, 0).sum()) == 0 and int(largest_mask(v, len(v)).sum()) == len(v)


def test_magnitude_matches_a_full_sort_when_nothing_ties():
    t = torch.randn(300, 70, generator=torch.Generator().manual_seed(1))
    k = int(0.3 * t.numel())
    order = torch.argsort(t.abs().reshape(-1), descending=True)
    expected = torch.zeros(t.numel())
    expected[order[:k]] = 1
    assert torch.equal(magnitude(t, 0.3), t * expected.reshape_as(t))


def test_breadcrumbs_band_drops_the_top_and_the_bottom():
    v = tied_values(10_000)
    out = magnitude_outliers(v, density=0.5, gamma=0.1)
    kept = out != 0
    assert int(kept.sum()) == 5_000 - int((v[kept] == 0).sum())  # zero magnitudes stay zero when kept
    assert v[kept].max() <= torch.sort(v).values[-1000]  # the 1,000 largest are gone
    assert v[kept].min() >= torch.sort(v).values[4000 - 1]  # and the 4,000 smallest


def test_large_tensors_take_the_radix_path_and_agree_with_kthvalue():
    g = torch.Generator().manual_seed(3)
    for v in (torch.randn(1 << 21, generator=g).abs(), tied_values(1 << 21),
              torch.cat([torch.zeros(1 << 20), torch.rand(1 << 20, generator=g) * 1e-30])):  # zeros, subnormals
        n = v.numel()
        for k in (1, n // 7, n // 2, n - 1):
            m = largest_mask(v, k)
            assert int(m.sum()) == k
            cut = torch.kthvalue(v, n - k + 1).values
            assert v[m == 1].min() == cut and bool((v[m == 0] <= cut).all())


def test_della_masks_by_blocks_of_rows_equal_the_whole_tensor_at_once():
    from splice.merge.methods.sparsify import rank_magnitude_sampling

    t = torch.randn(3000, 2048, generator=torch.Generator().manual_seed(4))  # 6M entries: two blocks of rows
    got = rank_magnitude_sampling(t, 0.4, 0.1, rescale=True, generator=torch.Generator().manual_seed(9))
    ranks = torch.argsort(t.abs(), dim=1).argsort(dim=1).float() + 1  # the whole-tensor reference (mergekit's)
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = 0.3 + ((ranks - lo) / (hi - lo)) * 0.2
    mask = torch.bernoulli(probs, generator=torch.Generator().manual_seed(9))
    masked = t * mask
    assert torch.equal(got, masked * (t.abs().sum() / masked.abs().sum()))
