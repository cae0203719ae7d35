import pytest
import torch
from safetensors.torch import save_file

from splice.delta import DeltaSet, Dense, LowRank, Scale, fingerprints_match, tensor_fingerprint
from splice.delta.deltaset import LazyDiffDeltaSet
from splice.errors import SpliceError
from splice.io import CheckpointReader


@pytest.fixture
def base_state():
    torch.manual_seed(0)
    return {"a.weight": torch.randn(4, 3), "b.weight": torch.randn(5, 5), "b.bias": torch.randn(5)}


def test_fingerprint_tolerates_rounding_but_not_another_base():
    t = torch.randn(300, 300)
    fp = tensor_fingerprint(t)
    assert tensor_fingerprint(t.clone()) == fp
    # float noise of a merge/unmerge round trip, or a bf16 copy of the same base, still match
    assert fingerprints_match(tensor_fingerprint(t + 1e-7 * torch.randn_like(t)), fp)
    assert fingerprints_match(tensor_fingerprint(t.bfloat16()), fp)
    # another model of the same shape, a scaled copy, or another shape do not
    assert not fingerprints_match(tensor_fingerprint(torch.randn(300, 300)), fp)
    assert not fingerprints_match(tensor_fingerprint(t * 1.1), fp)
    assert not fingerprints_match(tensor_fingerprint(t.reshape(900, 100)), fp)
    for odd in (torch.tensor(3.0), torch.zeros(0), torch.ones(3).bool()):
        assert fingerprints_match(tensor_fingerprint(odd), tensor_fingerprint(odd))


def test_mapping_nbytes_and_apply(base_state):
    B, A = torch.randn(4, 2), torch.randn(2, 3)
    ds = DeltaSet({"a.weight": LowRank(B, A), "b.bias": Dense(torch.ones(5))}, base="tiny", method="lora",
                  config={"r": 2})
    assert set(ds) == {"a.weight", "b.bias"} and len(ds) == 2 and "a.weight" in ds and "x" not in ds
    assert ds.nbytes == (8 + 6) * 4 + 5 * 4
    with pytest.raises(KeyError, match="a.weight"):
        ds["a.weigth"]
    state = {k: v.clone() for k, v in base_state.items()}
    ds.apply_to_state_dict(state, scale=0.5)
    torch.testing.assert_close(state["a.weight"], base_state["a.weight"] + 0.5 * B @ A, atol=1e-6, rtol=0)
    torch.testing.assert_close(state["b.bias"], base_state["b.bias"] + 0.5)
    assert torch.equal(state["b.weight"], base_state["b.weight"])


def test_apply_checks_everything_first(base_state):
    state = {k: v.clone() for k, v in base_state.items()}
    ds = DeltaSet({"a.weight": Dense(torch.ones(4, 3)), "missing.weight": Dense(torch.ones(2))})
    with pytest.raises(SpliceError, match="'missing.weight'"):
        ds.apply_to_state_dict(state)
    assert torch.equal(state["a.weight"], base_state["a.weight"])  # untouched
    ds = DeltaSet({"a.weight": Dense(torch.ones(4, 3)), "b.bias": Dense(torch.ones(6))})
    with pytest.raises(SpliceError, match=r"'b.bias'.*\(6,\).*\(5,\)"):
        ds.apply_to_state_dict(state)
    assert torch.equal(state["a.weight"], base_state["a.weight"])


def test_apply_to_parameters():
    layer = torch.nn.Linear(3, 2)
    before = layer.weight.detach().clone()
    DeltaSet({"weight": Dense(torch.ones(2, 3))}).apply_to_state_dict(dict(layer.named_parameters()))
    torch.testing.assert_close(layer.weight.detach(), before + 1)


def test_check_base(base_state):
    fps = {k: tensor_fingerprint(v) for k, v in base_state.items()}
    ds = DeltaSet({"a.weight": Scale(torch.ones(3), 1, (4, 3))}, fingerprint=fps)
    ds.check_base(base_state.__getitem__)
    other = dict(base_state, **{"b.weight": torch.randn(5, 5)})
    with pytest.raises(SpliceError, match="another base: tensor 'b.weight' fingerprint differs"):
        ds.check_base(other.__getitem__)
    del other["b.weight"]
    with pytest.raises(SpliceError, match="'b.weight' is missing"):
        ds.check_base(other.__getitem__)


def _write_pair(tmp_path, base_state):
    ft_state = {k: v + 0.1 * torch.randn_like(v) for k, v in base_state.items()}
    ft_state["b.bias"] = base_state["b.bias"].clone()  # unchanged tensor
    (tmp_path / "base").mkdir()
    (tmp_path / "ft").mkdir()
    save_file({**base_state, "step": torch.tensor([3])}, tmp_path / "base" / "model.safetensors")
    save_file({**{k: v.bfloat16() for k, v in ft_state.items()}, "step": torch.tensor([4])},
              tmp_path / "ft" / "model.safetensors")
    return ft_state


def test_lazy_diff_equals_dense_difference(tmp_path, base_state, monkeypatch):
    ft_state = _write_pair(tmp_path, base_state)
    calls = []
    real_get = CheckpointReader.get

    def counting_get(self, name):
        calls.append(name)
        return real_get(self, name)

    monkeypatch.setattr(CheckpointReader, "get", counting_get)
    ds = DeltaSet.from_checkpoints(tmp_path / "base", tmp_path / "ft")
    assert isinstance(ds, LazyDiffDeltaSet)
    assert calls == []  # nothing read at construction
    assert sorted(ds) == sorted(base_state)  # float tensors only: the int "step" is not a delta
    assert ds.nbytes == sum(v.numel() * 4 for v in base_state.values()) and calls == []
    for name in ds:
        before = len(calls)
        delta = ds[name]
        assert calls[before:] == [name, name]  # exactly the two tensors for this name, one after the other
        expected = ft_state[name].bfloat16().float() - base_state[name]
        torch.testing.assert_close(delta.materialize(), expected, atol=0, rtol=0)
    assert ds["b.bias"].materialize().abs().max() > 0  # bf16 round-trip noise...
    quiet = DeltaSet.from_checkpoints(tmp_path / "base", tmp_path / "ft", rtol_zero=2**-8)
    assert not quiet["b.bias"].materialize().any()  # ...which rtol_zero drops
    assert ds.fingerprint["a.weight"] == tensor_fingerprint(base_state["a.weight"])
    state = {k: v.clone() for k, v in base_state.items()}
    ds.apply_to_state_dict(state)
    torch.testing.assert_close(state["a.weight"], ft_state["a.weight"].bfloat16().float(), atol=1e-6, rtol=0)


def test_lazy_diff_rtol_zero(tmp_path, base_state):
    ft = {k: v * (1 + 1e-4) for k, v in base_state.items()}
    ft["a.weight"] = base_state["a.weight"] + 1.0
    for name, state in (("base", base_state), ("ft", ft)):
        save_file(state, tmp_path / f"{name}.safetensors")
    ds = DeltaSet.from_checkpoints(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", rtol_zero=1e-3)
    assert not ds["b.weight"].materialize().any()
    torch.testing.assert_close(ds["a.weight"].materialize(), torch.ones(4, 3))


def test_lazy_diff_mismatches_are_named(tmp_path, base_state):
    save_file(base_state, tmp_path / "base.safetensors")
    save_file({**base_state, "extra.weight": torch.ones(2)}, tmp_path / "ft1.safetensors")
    with pytest.raises(SpliceError, match="'extra.weight'.*ft1.safetensors but not in"):
        DeltaSet.from_checkpoints(tmp_path / "base.safetensors", tmp_path / "ft1.safetensors")
    save_file({**base_state, "b.bias": torch.ones(6)}, tmp_path / "ft2.safetensors")
    with pytest.raises(SpliceError, match=r"'b.bias': shape \(5,\)"):
        DeltaSet.from_checkpoints(tmp_path / "base.safetensors", tmp_path / "ft2.safetensors")
    ds = DeltaSet.from_checkpoints(tmp_path / "base.safetensors", tmp_path / "base.safetensors")
    with pytest.raises(KeyError):
        ds["nope"]


def counting_compute(calls):
    """A group's compute that records each call: deltas for the group's weight (2, 3) and bias (2,)."""
    from splice.delta import Dense

    def compute(group):
        calls.append(group)
        return {f"{group}.weight": Dense(torch.ones(2, 3)), f"{group}.bias": Dense(torch.ones(2))}
    return compute


def test_grouped_lazy_deltaset_computes_a_group_when_read_and_keeps_only_the_last():
    from splice.delta import Dense, GroupedLazyDeltaSet

    calls = []
    compute = counting_compute(calls)

    eager = Dense(torch.zeros(4))
    ds = GroupedLazyDeltaSet({"a.weight": "a", "a.bias": "a", "n.weight": eager, "b.weight": "b", "b.bias": "b"},
                             {"a.weight": torch.Size([2, 3]), "a.bias": torch.Size([2]),
                              "b.weight": torch.Size([2, 3]), "b.bias": torch.Size([2])}, compute, method="ia3")
    assert list(ds) == ["a.weight", "a.bias", "n.weight", "b.weight", "b.bias"] and len(ds) == 5
    assert ds.delta_shape("b.weight") == (2, 3) and ds.delta_shape("n.weight") == (4,) and calls == []
    assert ds["n.weight"] is eager and calls == []
    assert ds["a.weight"].shape == (2, 3) and ds["a.bias"].shape == (2,) and calls == ["a"]  # one computation
    ds["b.bias"], ds["a.weight"]
    assert calls == ["a", "b", "a"]  # only the last group is kept
    with pytest.raises(KeyError, match="'a.wieght'.*a.weight"):
        ds["a.wieght"]


def test_grouped_lazy_deltaset_keeps_as_many_groups_as_asked_for_interleaved_readers():
    from splice.delta import GroupedLazyDeltaSet

    calls = []
    compute = counting_compute(calls)

    names = {f"{g}.{p}": g for g in "abc" for p in ("weight", "bias")}
    shapes = {n: torch.Size([2, 3] if n.endswith("weight") else [2]) for n in names}
    ds = GroupedLazyDeltaSet(names, shapes, compute, keep=2)
    for name in ("a.weight", "b.weight", "a.bias", "b.bias"):  # two workers' reads, interleaved
        ds[name]
    assert calls == ["a", "b"]
    ds["c.weight"], ds["b.weight"], ds["a.weight"]  # b was read last, so a is the one dropped for c
    assert calls == ["a", "b", "c", "a"]
    with pytest.raises(ValueError, match="keep must be at least 1"):
        GroupedLazyDeltaSet(names, shapes, compute, keep=0)
