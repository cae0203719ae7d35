import json

import pytest
import torch
from safetensors.torch import save_file

from splice.errors import SpliceError
from splice.io import CheckpointReader, atomic_output_dir, read_json, save_safetensors_sharded, write_json


@pytest.fixture
def state():
    torch.manual_seed(0)
    return {f"layer{i}.weight": torch.randn(16, 16) for i in range(6)} | {"bias": torch.randn(16).bfloat16()}


def test_single_file_reader(tmp_path, state):
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt", "note": "hi"})
    for path in (tmp_path, tmp_path / "model.safetensors"):
        r = CheckpointReader(path)
        assert sorted(r.keys()) == sorted(state) and "bias" in r and "nope" not in r
        assert r.shape("layer0.weight") == (16, 16) and r.dtype("bias") == torch.bfloat16
        assert torch.equal(r.get("layer3.weight"), state["layer3.weight"])
        assert r.metadata["note"] == "hi"
    with pytest.raises(SpliceError, match=r"model.safetensors: no tensor named 'layer9.weight'.*did you mean"):
        r.get("layer9.weight")


def test_adapter_and_bin_folders(tmp_path, state):
    (tmp_path / "a").mkdir()
    save_file(state, tmp_path / "a" / "adapter_model.safetensors")
    assert torch.equal(CheckpointReader(tmp_path / "a").get("bias"), state["bias"])
    (tmp_path / "b").mkdir()
    torch.save(state, tmp_path / "b" / "pytorch_model.bin")
    r = CheckpointReader(tmp_path / "b")
    got = r.get("layer1.weight")
    assert torch.equal(got, state["layer1.weight"])
    got.add_(1)  # callers' in-place edits must not leak into later reads
    assert torch.equal(r.get("layer1.weight"), state["layer1.weight"])


def test_bin_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(SpliceError, match="pytorch_model.bin: cannot load"):
        CheckpointReader(tmp_path)


def test_sharded_round_trip(tmp_path, state):
    out = tmp_path / "out"
    paths = save_safetensors_sharded(state.items(), out, max_shard_bytes=2 * 16 * 16 * 4, metadata={"k": "v"})
    # two 1 KiB weights per shard, then the bias alone
    assert [p.name for p in paths] == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert not list(out.glob(".*"))  # no temporary shards left
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == {p.name for p in paths}
    r = CheckpointReader(out)
    assert r.keys() == list(state)
    for name, t in state.items():
        assert torch.equal(r.get(name), t)
    assert r.metadata["total_size"] == index["metadata"]["total_size"]


def test_single_shard_views_and_tied_weights(tmp_path):
    big = torch.randn(8, 8)
    tensors = [("tied.a", big), ("tied.b", big), ("view", big[:, 2]), ("slice", big[2:4])]
    paths = save_safetensors_sharded(iter(tensors), tmp_path, progress=True)
    assert [p.name for p in paths] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    r = CheckpointReader(tmp_path)
    for name, t in tensors:
        assert torch.equal(r.get(name), t)
    with pytest.raises(SpliceError, match="'x' appears twice"):
        save_safetensors_sharded([("x", big), ("x", big)], tmp_path / "dup")


def test_missing_shard_and_missing_path(tmp_path, state):
    save_safetensors_sharded(state.items(), tmp_path / "m", max_shard_bytes=1)
    (tmp_path / "m" / "model-00002-of-00007.safetensors").unlink()
    with pytest.raises(SpliceError, match="model.safetensors.index.json: shard 'model-00002-of-00007.safetensors'"):
        CheckpointReader(tmp_path / "m")
    with pytest.raises(SpliceError, match="nowhere: no such file"):
        CheckpointReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(SpliceError, match=r"empty: no weights file found.*folder holds config.json"):
        CheckpointReader(tmp_path / "empty")


def test_truncated_and_garbage_files(tmp_path, state):
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SpliceError, match=r"model.safetensors: truncated"):
        CheckpointReader(tmp_path)
    path.write_bytes(data[:20])
    with pytest.raises(SpliceError, match=r"model.safetensors: .*truncated"):
        CheckpointReader(path)
    path.write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(SpliceError, match=r"model.safetensors: not a safetensors file"):
        CheckpointReader(path)
    path.write_bytes((20).to_bytes(8, "little") + b"{not json!!!!!!!!!!!" + b"\0" * 64)
    with pytest.raises(SpliceError, match=r"model.safetensors: corrupt"):
        CheckpointReader(path)
    for entry in ({"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]},  # a TypeError on comparing
                  {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}):  # unhashable: a TypeError on lookup
        header = json.dumps({"x": entry}).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
        with pytest.raises(SpliceError, match=r"model.safetensors: corrupt safetensors file \(bad header entry for 'x'"):
            CheckpointReader(path)


def test_an_index_naming_no_file_and_a_save_over_old_shards_are_refused(tmp_path, state):
    save_safetensors_sharded(state.items(), tmp_path / "m", max_shard_bytes=1)
    with pytest.raises(SpliceError, match=r"m: already holds model-00001-of-00007.safetensors; save into an empty"):
        save_safetensors_sharded(state.items(), tmp_path / "m")  # the old index would still point at old shards
    index = read_json(tmp_path / "m" / "model.safetensors.index.json")
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = ["not", "a", "file"]
    write_json(tmp_path / "m" / "model.safetensors.index.json", index)
    with pytest.raises(SpliceError, match=rf"weight_map gives tensor '{name}' the shard \['not', 'a', 'file'\]"):
        CheckpointReader(tmp_path / "m")


def test_atomic_output_dir(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-") and tmp.is_dir()
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"

    with pytest.raises(SpliceError, match="output folder exists; pass --force"):
        with atomic_output_dir(out):
            pytest.fail("must refuse before yielding")

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no tmp folder left behind

    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_json_helpers(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": [1, 2]})
    assert read_json(path) == {"a": [1, 2]}
    path.write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(SpliceError, match=r"x.json: invalid JSON at line 3 column 3"):
        read_json(path)
    with pytest.raises(SpliceError, match=r"missing.json: file not found"):
        read_json(tmp_path / "missing.json")
    path.write_text("[1]")
    with pytest.raises(SpliceError, match="expected a JSON object"):
        read_json(path)
