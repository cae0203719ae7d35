from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from splice.errors import SpliceError
from splice.io.checkpoints import CheckpointReader
from splice.io.stream_writer import write_planned_shards


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.weight": torch.randn(3, 11, generator=g).to(torch.bfloat16),
        "c.scalar": torch.tensor(2.5, dtype=torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 4),
        "g.weight": torch.randn(4, 4, generator=g, dtype=torch.float64),
    }


def layout(tensors):
    return [(n, t.shape, t.dtype) for n, t in tensors.items()]


def test_single_file_reads_back_exactly_with_safetensors(tmp_path):
    tensors = sample()
    files = write_planned_shards(layout(tensors), tensors.items(), tmp_path, metadata={"who": "test"})
    assert [f.name for f in files] == ["model.safetensors"]
    back = load_file(str(files[0]))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {"format": "pt", "who": "test"}
    header_len = int.from_bytes(files[0].read_bytes()[:8], "little")
    assert header_len % 8 == 0  # the data starts 8-byte aligned after the padded header


def test_shards_and_index_match_the_plan(tmp_path):
    tensors = {f"layer{i}.weight": torch.full((10, 10), float(i)) for i in range(5)}
    files = write_planned_shards(layout(tensors), tensors.items(), tmp_path, max_shard_bytes=500)
    assert [f.name for f in files] == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 400
    assert index["weight_map"]["layer3.weight"] == "model-00004-of-00005.safetensors"
    with CheckpointReader(tmp_path) as reader:
        for name, t in tensors.items():
            assert torch.equal(reader.get(name), t)


@pytest.mark.parametrize("bad", ["order", "shape", "dtype", "extra"])
def test_a_stream_that_breaks_the_plan_is_refused_and_leaves_no_file(tmp_path, bad):
    tensors = sample()
    stream = list(tensors.items())
    if bad == "order":
        stream[0], stream[1] = stream[1], stream[0]
    elif bad == "shape":
        stream[2] = (stream[2][0], torch.zeros(3))
    elif bad == "dtype":
        stream[0] = (stream[0][0], stream[0][1].double())
    else:
        stream.append(("z", torch.zeros(1)))
    with pytest.raises(SpliceError, match="arrives"):
        write_planned_shards(layout(tensors), stream, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_stream_that_ends_early_is_refused_and_leaves_no_file(tmp_path):
    tensors = {f"t{i}": torch.ones(10, 10) for i in range(4)}
    with pytest.raises(SpliceError, match="ended before tensor 't3'"):
        write_planned_shards(layout(tensors), list(tensors.items())[:3], tmp_path, max_shard_bytes=450)
    assert list(tmp_path.iterdir()) == []


def test_an_error_in_the_producer_removes_partial_shards(tmp_path):
    tensors = {f"t{i}": torch.ones(10, 10) for i in range(4)}

    def stream():
        yield "t0", tensors["t0"]
        yield "t1", tensors["t1"]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_planned_shards(layout(tensors), stream(), tmp_path, max_shard_bytes=450)
    assert list(tmp_path.iterdir()) == []
