"""wq.loading.shards.ShardReader: tensors read with plain file reads equal safetensors' own, a corrupt file
is named, and reading leaves no file pages in the process's resident set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wq.loading.shards import ShardError, ShardReader


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(33, generator=g),
        "b.half": torch.randn(5, 3, generator=g).half(),
        "b.ids": torch.randint(-1000, 1000, (7, 4), generator=g, dtype=torch.int32),
        "b.long": torch.randint(-1000, 1000, (3,), generator=g),
        "b.mask": torch.rand(9, generator=g) > 0.5,
        "b.bytes": torch.randint(0, 255, (11,), generator=g, dtype=torch.uint8),
        "c.fp8": torch.randn(6, 8, generator=g).to(torch.float8_e4m3fn),
        "c.scalar": torch.tensor(3.5),
        "c.empty": torch.zeros(0, 4),
    }


def test_reads_every_dtype_as_safetensors_does(tmp_path):
    tensors = _mixed()
    save_file({k: v for k, v in tensors.items() if k.startswith(("a.", "c."))}, str(tmp_path / "m1.safetensors"))
    save_file({k: v for k, v in tensors.items() if k.startswith("b.")}, str(tmp_path / "m2.safetensors"))
    reader = ShardReader(tmp_path)  # no index: the files' headers say who holds what
    ref = {**load_file(str(tmp_path / "m1.safetensors")), **load_file(str(tmp_path / "m2.safetensors"))}
    assert sorted(reader.names()) == sorted(ref)
    for name, want in ref.items():
        got = reader.get(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                           want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want), name
        assert reader.nbytes(name) == want.numel() * want.element_size()
        assert reader.shape(name) == tuple(want.shape)
    reader.close()


def test_truncated_shard_is_named(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ShardError, match="model.safetensors.*truncated"):
        ShardReader(tmp_path).get("w")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ShardError, match="model.safetensors.*corrupt"):
        ShardReader(tmp_path)


def test_missing_name_says_where_the_index_points(tmp_path):
    save_file({"w": torch.randn(4, 4)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors",
                                                                                       "v": "a.safetensors"}}))
    with pytest.raises(KeyError, match="v: not in"):
        ShardReader(tmp_path).get("v")


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    return -1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_reading_keeps_no_file_pages_resident(tmp_path):
    """A memory-mapped read keeps every page it touched in RSS while the file stays mapped (the whole
    model, by the end of a streamed run); plain reads leave only the tensors the caller still holds."""
    mib = 48
    save_file({f"t{i}": torch.ones(mib * 2**20 // 4 // 8) for i in range(8)}, str(tmp_path / "model.safetensors"))
    reader = ShardReader(tmp_path)
    before = _rss_file_kib()
    for name in reader.names():
        t = reader.get(name)
        assert float(t.sum()) == t.numel()  # every page touched
        del t
    grown = _rss_file_kib() - before
    assert grown < mib * 1024 // 4, f"RssFile grew by {grown} KiB reading {mib} MiB"


# ------------------------------------------------------------------------------------------ writing
def test_shard_writer_files_read_back_with_safetensors_and_the_reader(tmp_path):
    """Tensors of every element size, in an order that would misalign them if written as they come: the
    files are valid safetensors (its own loader and transformers' read them), every tensor starts at a
    multiple of its element size, and shards split at max_bytes with an index."""
    from wq.writing.shards import ShardWriter

    tensors = _mixed()
    w = ShardWriter(tmp_path, max_bytes=1200)
    for k, v in tensors.items():
        w.add(k, v)
    names = w.close()
    assert len(names) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no data files left behind
    back = {}
    for f in names:
        back.update(load_file(str(tmp_path / f)))
        raw = (tmp_path / f).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert (8 + n) % 8 == 0
        header = json.loads(raw[8:8 + n])
        assert header.pop("__metadata__") == {"format": "pt"}
        sizes = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "BOOL": 1, "U8": 1, "F8_E4M3": 1}
        for e in header.values():
            assert e["data_offsets"][0] % sizes[e["dtype"]] == 0, e
    reader = ShardReader(tmp_path)
    for k, v in tensors.items():
        for got in (back[k], reader.get(k)):
            assert got.dtype == v.dtype and got.shape == v.shape, k
            assert torch.equal(got.view(torch.uint8), v.view(torch.uint8)) if v.dtype == torch.float8_e4m3fn \
                else torch.equal(got, v), k


def test_shard_writer_holds_no_tensor_in_memory(tmp_path):
    """What add() was given is on disk before add() returns (the writer buffers nothing), and the shard
    reads back whole."""
    from wq.writing.shards import ShardWriter

    w = ShardWriter(tmp_path)
    t = torch.randn(256, 256)
    w.add("t", t)
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert on_disk >= t.numel() * 4, on_disk
    w.add("single", torch.ones(3))
    assert w.close() == ["model.safetensors"]
    back = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(back["t"], t) and back["single"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("kernel", [True, False])
def test_stored_tensors_are_copied_file_to_file(tmp_path, monkeypatch, kernel):
    """Plain tensors pass from a checkpoint into a new shard without being read into memory (StoredTensor),
    interleaved with in-memory ones, in the kernel or (where copy_file_range fails) in plain pieces."""
    import os

    from wq.loading.shards import StoredTensor
    from wq.writing.shards import ShardWriter

    tensors = _mixed()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = ShardReader(tmp_path)
    if not kernel:
        def refuse(*a, **k):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(ShardReader, "get", lambda *a, **k: pytest.fail("read into memory"))
    out = tmp_path / "out"
    out.mkdir()
    w = ShardWriter(out, max_bytes=1200)
    for i, k in enumerate(tensors):
        st = reader.stored(k)
        assert isinstance(st, StoredTensor) and st.nbytes == tensors[k].numel() * tensors[k].element_size()
        w.add(k, st)
        w.add(f"extra.{i}", torch.full((3,), float(i)))  # in-memory tensors in between
    back = {}
    for f in w.close():
        back.update(load_file(str(out / f)))
    for k, v in tensors.items():
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    assert all(back[f"extra.{i}"].tolist() == [float(i)] * 3 for i in range(len(tensors)))
