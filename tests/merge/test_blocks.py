"""Merging in row blocks (splice.merge.blocks) gives the whole-tensor result: the same masks, sign elections and bits
for deterministic methods, and for rescaled random ones the same kept entries with the rescale factor equal to
float rounding. Checked per tensor on constructed cases (ties at the magnitude cut spread over blocks), and end to
end against mergekit with every tensor of a tiny model forced through the blocked path."""
from __future__ import annotations

import pytest
import torch

from splice.merge import blocks as blocks_mod
from splice.merge import merge
from splice.merge.blocks import BlockSource
from splice.merge.methods.registry import TensorContext, get_merge_method, merge_method_names

BLOCKED = sorted(n for n in merge_method_names() if get_merge_method(n).blocks is not None)
CASES = [
    ("task_arithmetic", {"weight": [0.5, 1.0, -0.3]}),
    ("ties", {"weight": [1.0, 0.7, 0.4], "density": [0.5, 0.3, 0.9], "normalize": True}),
    ("ties", {"weight": [1.0, 1.0, 1.0], "density": [0.2, 0.2, 0.2], "rescale": True}),
    ("breadcrumbs", {"weight": [1.0, 0.5, 0.5], "density": [0.6, 0.6, 0.3], "gamma": [0.05, 0.1, 0.0]}),
    ("breadcrumbs_ties", {"weight": [1.0, 0.5, 0.8], "density": [0.9, 0.5, 0.4], "gamma": [0.2, 0.01, 0.01],
                          "rescale": True}),
    ("dare_linear", {"weight": [1.0, 0.5, 0.3], "density": [0.3, 0.5, 0.9]}),
    ("dare_ties", {"weight": [1.0, 0.5, 0.3], "density": [0.3, 0.5, 1.0], "rescale": False}),
    ("della", {"weight": [1.0, 0.6, 0.3], "density": [0.4, 0.5, 0.6], "epsilon": [0.1, 0.2, 0.3]}),
    ("della_linear", {"weight": [1.0, 0.6, 0.3], "density": [0.4, 0.5, 0.6], "epsilon": [0.1, 0.1, 0.1]}),
    ("generalized_task_arithmetic", {"weight": [1.0, -1.0, 0.5], "density": [0.5, 0.5, 0.5],
                                     "sparsify": "magnitude", "consensus": "count", "normalize": True}),
    ("linear", {"weight": [0.2, 0.5, 0.3]}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
]
RESCALED = {"dare_linear", "della", "della_linear"}


def tensors(shape: tuple[int, ...], ties: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g)
    deltas = [torch.randn(shape, generator=g) * 0.01 for _ in range(3)]
    if ties:  # few distinct magnitudes: many entries tie at every cut, and the tied ones span many blocks
        deltas = [(d * 300).round() / 300 for d in deltas]
    return base, [base + d for d in deltas]


def whole_and_blocked(name: str, params: dict, shape: tuple[int, ...], ties: bool, block: int):
    method = get_merge_method(name)
    base, models = tensors(shape, ties)
    def context() -> TensorContext:
        return TensorContext(name="t", generator=torch.Generator().manual_seed(3))

    if method.space == "delta":
        whole = method.fn(base, [m - base for m in models], ctx=context(), **params) + base
    else:
        whole = method.fn(base if method.needs_base else None, list(models), ctx=context(), **params)
    source = BlockSource(base, models, lambda t, i: t.to(torch.float32, copy=True),
                         deltas=method.space == "delta", block_elements=block)
    out = torch.empty_like(base)
    seen = []
    for rows, part in method.blocks(source, ctx=context(), **params):
        seen.append(rows)
        out[rows] = part + source.base_block(rows) if method.space == "delta" else part
    assert [r.start for r in seen] == sorted(r.start for r in seen) and len(seen) > 1
    return base, whole, out


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied"])
@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_blocked_equals_whole(name, params, ties):
    base, whole, blocked = whole_and_blocked(name, params, (37, 53), ties, block=200)
    if name == "model_stock" and not params.get("filter_wise"):  # t from float64 block sums: float rounding
        torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)
    elif name in RESCALED or params.get("rescale"):  # same kept entries; the L1 factor equal to float rounding
        if get_merge_method(name).space == "delta":
            assert torch.equal(whole == base, blocked == base)
        torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(blocked, whole)


def test_every_blocked_method_is_covered():
    assert {n for n, _ in CASES} == set(BLOCKED)


def test_three_dimensional_tensors_block_by_leading_rows():
    _, whole, blocked = whole_and_blocked("ties", {"weight": [1.0, 1.0, 1.0], "density": [0.4, 0.4, 0.4]},
                                       (9, 5, 7), True, block=40)
    assert torch.equal(whole, blocked)


@pytest.fixture
def all_blocked(monkeypatch):
    """Every ≥2-D tensor goes through the blocked path, in blocks of a few rows."""
    monkeypatch.setattr(blocks_mod, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(blocks_mod, "BLOCK_ELEMENTS", 96)


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"])
def test_blocked_path_matches_mergekit_end_to_end(name, family, weights, tmp_path, all_blocked):
    from tests.merge.test_mergekit_parity import assert_same_tensors, config_for, mergekit_merge

    fam = family("llama", n=3, layers=2)
    config = config_for(name, fam)
    ours = weights(merge(config, tmp_path / "splice", progress=False))
    theirs = weights(mergekit_merge(config, tmp_path / "mergekit"))
    assert_same_tensors(ours, theirs)


@pytest.mark.parametrize("name", ["dare_ties", "della"])
def test_blocked_random_methods_equal_the_whole_path(name, family, weights, tmp_path, monkeypatch):
    from tests.merge.test_mergekit_parity import config_for

    fam = family("llama", n=3, layers=2)
    config = config_for(name, fam)
    whole = weights(merge(config, tmp_path / "whole", progress=False, seed=5))
    monkeypatch.setattr(blocks_mod, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(blocks_mod, "BLOCK_ELEMENTS", 96)
    blocked = weights(merge(config, tmp_path / "blocked", progress=False, seed=5))
    base = weights(fam.base)
    for key in whole:
        assert torch.equal(whole[key] == base[key], blocked[key] == base[key]), key
        torch.testing.assert_close(blocked[key], whole[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in BLOCKED if get_merge_method(n).space == "delta"])
def test_a_tensor_only_the_base_feeds_has_no_delta_in_blocks_as_whole(name):
    # A slice whose only source is the base: the whole function returns a zero delta; the blocked one raised
    # IndexError (it met this only on tensors large enough to be blocked, so only on real-size models).
    method = get_merge_method(name)
    base = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    source = BlockSource(base, [], lambda t, i: t.to(torch.float32, copy=True), deltas=True, block_elements=8)
    ctx = TensorContext(name="t", generator=torch.Generator().manual_seed(3))
    whole = method.fn(base, [], ctx=ctx, weight=[])
    parts = list(method.blocks(source, ctx=ctx, weight=[]))
    assert len(parts) == 4 and not whole.any()
    assert torch.equal(torch.cat([p for _, p in parts]), whole)
