"""The compressed-delta folder: exact round trips for every form, and one-line errors for damaged folders."""
from __future__ import annotations

import json

import pytest
import torch

from splice.compress import compress, load_compressed, save_compressed
from splice.compress.storage import DELTA_CONFIG, DELTA_WEIGHTS
from splice.delta.deltaset import DeltaSet
from splice.delta.forms import Dense, LowRank
from splice.errors import SpliceError


def sample() -> DeltaSet:
    g = torch.Generator().manual_seed(0)
    return DeltaSet({
        "layer.0.weight": Dense(torch.randn(48, 40, generator=g)),
        "layer.0.bias": Dense(torch.randn(48, generator=g)),
        "layer.1.weight": LowRank(torch.randn(40, 4, generator=g), torch.randn(4, 48, generator=g), scale=2.0),
        "emb.weight": Dense(torch.randn(300, 40, generator=g)),
    }, base="some-base", fingerprint={"layer.0.weight": "48x40:1:1"})


@pytest.mark.parametrize("methods, params", [
    ("quantize", {"bits": 8}), ("quantize", {"bits": 3, "group_size": 0}), ("quantize", {"bits": 1}),
    ("dare", {"density": 0.02}),  # few kept: int32 positions
    ("magnitude", {"density": 0.5}),  # many kept: a bitmask
    ("compeft", {"density": 0.1}), ("darex", {"density": 0.3}),
    ("svd", {"rank": 6}), ("svd,quantize", {"energy": 0.8, "bits": 4}),
    ("delta_come", {"rank": 20}), ("svd,dare,quantize", {"rank": 8, "density": 0.5, "bits": 2}),
])
def test_save_load_gives_the_same_deltas(tmp_path, methods, params):
    small, report = compress(sample(), methods, **params)
    save_compressed(small, tmp_path / "out")
    back = load_compressed(tmp_path / "out")
    assert list(back) == list(small) and back.base == "some-base"
    assert back.fingerprint == {"layer.0.weight": "48x40:1:1"}
    for name in small:
        assert torch.equal(back[name].materialize(), small[name].materialize()), name
        assert back[name].nbytes == small[name].nbytes
    # the report's bytes are what the file holds (plus the safetensors header)
    stored = sum(t.numel() * t.element_size() for t in _tensors(tmp_path / "out" / DELTA_WEIGHTS))
    assert stored == report.bytes_after


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path)).values()


def test_the_output_is_refused_when_it_exists_and_replaced_with_force(tmp_path):
    small, _ = compress(sample(), "quantize", bits=8)
    save_compressed(small, tmp_path / "out")
    with pytest.raises(SpliceError, match="exists"):
        save_compressed(small, tmp_path / "out")
    save_compressed(small, tmp_path / "out", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_only_compressed_deltas_are_saved(tmp_path):
    with pytest.raises(SpliceError, match="only compressed"):
        save_compressed(sample(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _saved(tmp_path):
    small, _ = compress(sample(), "dare,quantize", density=0.3, bits=4)
    return save_compressed(small, tmp_path / "out")


def test_a_truncated_weights_file_is_one_line(tmp_path):
    out = _saved(tmp_path)
    data = (out / DELTA_WEIGHTS).read_bytes()
    (out / DELTA_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(SpliceError, match="truncated") as info:
        load_compressed(out)
    assert "\n" not in str(info.value) and DELTA_WEIGHTS in str(info.value)


def test_a_config_that_does_not_match_the_tensors_is_one_line(tmp_path):
    out = _saved(tmp_path)
    cfg = json.loads((out / DELTA_CONFIG).read_text())
    cfg["tensors"]["layer.0.weight"]["parts"]["w"]["nnz"] += 5
    (out / DELTA_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(SpliceError, match="layer.0.weight") as info:
        load_compressed(out)
    assert "\n" not in str(info.value)


def test_a_foreign_json_is_refused(tmp_path):
    out = _saved(tmp_path)
    (out / DELTA_CONFIG).write_text(json.dumps({"format": "other"}))
    with pytest.raises(SpliceError, match="not a splice compressed-delta config"):
        load_compressed(out)
    (out / DELTA_CONFIG).write_text("{not json")
    with pytest.raises(SpliceError, match="invalid JSON"):
        load_compressed(out)


def test_a_lazy_diff_ignores_an_integer_buffer_only_one_checkpoint_has(tmp_path):
    from safetensors.torch import save_file

    # transformers 5 no longer saves `position_ids`; a base saved by an older version still has it
    save_file({"w": torch.ones(2, 2), "position_ids": torch.arange(4)}, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.full((2, 2), 3.0)}, str(tmp_path / "ft.safetensors"))
    diff = DeltaSet.from_checkpoints(tmp_path / "base.safetensors", tmp_path / "ft.safetensors")
    assert list(diff) == ["w"] and torch.equal(diff["w"].tensor, torch.full((2, 2), 2.0))
    save_file({"w": torch.ones(2, 2), "extra": torch.ones(3)}, str(tmp_path / "base2.safetensors"))
    with pytest.raises(SpliceError, match="'extra'"):
        DeltaSet.from_checkpoints(tmp_path / "base2.safetensors", tmp_path / "ft.safetensors")


def test_an_all_zero_delta_survives_every_method_and_the_round_trip(tmp_path):
    # e.g. the pooler of a mean-pooled classifier: trained in full, yet its delta is exactly zero
    ds = DeltaSet({"pooler.weight": Dense(torch.zeros(8, 8)), "pooler.bias": Dense(torch.zeros(8))})
    for methods, params in (("dare,quantize", {"density": 0.5, "bits": 4}), ("compeft", {}),
                            ("magnitude,quantize", {"bits": 1})):
        small, report = compress(ds, methods, **params)
        save_compressed(small, tmp_path / methods, force=True)
        back = load_compressed(tmp_path / methods)
        assert all(not back[n].materialize().any() for n in back) and report.mean_error == 0.0


def test_repeated_sparse_positions_and_a_scaled_dense_entry_are_refused(tmp_path):
    # Applying sums repeated positions, re-compressing overwrites them: one file, two deltas. And a dense entry's
    # scale was silently ignored.
    from safetensors.torch import load_file, save_file

    deltas = DeltaSet({"w": Dense(torch.zeros(100, 100).index_fill_(1, torch.tensor([5, 7]), 1.0))})
    small, _ = compress(deltas, "dare", density=0.5, seed=0)
    out = save_compressed(small, tmp_path / "c")
    cfg = json.loads((out / DELTA_CONFIG).read_text())
    part = cfg["tensors"]["w"]["parts"]["w"]
    assert part["index"] == "int32"
    tensors = load_file(str(out / DELTA_WEIGHTS))
    index = tensors["w::w::index"].clone()
    index[1] = index[0]
    save_file({**tensors, "w::w::index": index}, str(out / DELTA_WEIGHTS))
    with pytest.raises(SpliceError, match="sparse positions are not strictly increasing"):
        load_compressed(out)
    save_file(tensors, str(out / DELTA_WEIGHTS))
    cfg["tensors"]["w"]["scale"] = 2.0
    (out / DELTA_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(SpliceError, match="tensor 'w': a dense entry has scale 2.0"):
        load_compressed(out)
