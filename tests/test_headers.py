"""Safetensors files read by their headers: sizes without weights, and broken files named before any load."""

import json

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import save_file

import wq
from wq.loading.headers import ShardError, check_shards, read_header, shard_files


def _write(path, tensors):
    save_file(tensors, str(path))
    return path


def test_header_gives_shapes_dtypes_and_sizes(tmp_path):
    f = _write(tmp_path / "model.safetensors", {"a": torch.zeros(3, 5, dtype=torch.bfloat16),
                                                 "b": torch.zeros(7, dtype=torch.int32)})
    h = read_header(f)
    assert (h["a"].shape, h["a"].dtype, h["a"].nbytes, h["a"].numel) == ((3, 5), "BF16", 30, 15)
    assert (h["b"].shape, h["b"].dtype, h["b"].nbytes, h["b"].file) == ((7,), "I32", 28, "model.safetensors")


@pytest.mark.parametrize("cut,needle", [(-10, "is truncated: .* bytes missing|truncated"), (20, "truncated or corrupt"),
                                        (4, "truncated .*8-byte")])
def test_truncated_files_are_named(tmp_path, cut, needle):
    f = _write(tmp_path / "model.safetensors", {"w": torch.ones(64, 64)})
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut < 0 else data[:cut])
    with pytest.raises(ShardError, match=needle) as e:
        read_header(f)
    assert str(f) in str(e.value)


def test_corrupt_header_and_trailing_bytes(tmp_path):
    f = _write(tmp_path / "model.safetensors", {"w": torch.ones(4)})
    data = bytearray(f.read_bytes())
    f.write_bytes(bytes(data) + b"junk")
    with pytest.raises(ShardError, match="corrupt: 4 bytes after the last tensor"):
        read_header(f)
    data[9] = ord("#")  # inside the JSON
    f.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="corrupt: its header is not valid JSON"):
        read_header(f)


def test_index_with_missing_shard_or_wrong_entry(tmp_path):
    _write(tmp_path / "model-00001-of-00002.safetensors", {"a": torch.ones(2)})
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert [p.name for p in shard_files(tmp_path)] == ["model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors"]
    with pytest.raises(ShardError, match="lists model-00002-of-00002.safetensors .*missing"):
        check_shards(tmp_path)
    _write(tmp_path / "model-00002-of-00002.safetensors", {"c": torch.ones(2)})
    with pytest.raises(ShardError, match="says b is in model-00002-of-00002.safetensors, which does not hold it"):
        check_shards(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ShardError, match="index.json is corrupt"):
        check_shards(tmp_path)


def test_wq_load_names_the_truncated_file(tmp_path):
    model = make_tiny_llama()
    wq.quantize_model(model, "W4G32", progress=False)
    wq.save(model, tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ShardError, match=f"{f} is truncated"):
        wq.load(tmp_path / "ck")
