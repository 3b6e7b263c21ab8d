"""wq.heap: freed heap memory handed back between tensors and blocks."""

from __future__ import annotations

import platform

import pytest

import wq.heap as heap


def test_trimmer_trims_once_per_budget(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "trim", lambda: calls.append(1) or True)
    t = heap.Trimmer(every=100)
    for n in (40, 40, 19):
        t.tick(n)
    assert calls == []  # 99 bytes: not yet
    t.tick(1)
    assert calls == [1] and t.since == 0
    t.tick(250)  # one call however far past the budget
    assert calls == [1, 1]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_trim_reaches_glibc():
    assert heap._malloc_trim() is not None
    heap.trim()  # returns whether memory was released; must not raise


def test_releasing_a_streamed_block_trims(monkeypatch, tmp_path):
    import torch
    import zoo

    from wq.loading.shards import ShardReader
    from wq.loading.skeleton import Skeleton

    zoo.build("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    calls = []
    monkeypatch.setattr("wq.loading.skeleton.trim", lambda: calls.append(1))
    sk = Skeleton(ShardReader.open(tmp_path))
    sk.load_block(0, "cpu", torch.float32)
    sk.release_block(0)
    assert calls == [1] and all(p.device.type == "meta" for p in sk.blocks[0].parameters())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_sets_glibc_options(monkeypatch):
    seen = []
    monkeypatch.setattr(heap, "_mallopt", lambda: lambda p, v: seen.append((p, v)) or 1)
    assert heap.keep_freed_memory(mmap_threshold=1 << 20) is True
    assert (heap._M_MMAP_THRESHOLD, 1 << 20) in seen and len(seen) == 3
    monkeypatch.setattr(heap, "_mallopt", lambda: None)
    assert heap.keep_freed_memory() is False


def test_low_mem_hands_freed_memory_back(monkeypatch, tmp_path):
    """--low-mem pins glibc's mmap threshold (large tensors get their own mappings); a run without it does not."""
    import zoo

    from wq.quantize import main

    seen = []
    monkeypatch.setattr(heap, "_mallopt", lambda: lambda p, v: seen.append((p, v)) or 1)
    assert heap.return_freed_memory() is True and seen == [(heap._M_MMAP_THRESHOLD, 1 << 20)]
    src = tmp_path / "src"
    zoo.build("llama").save_pretrained(src)
    seen.clear()
    assert main([str(src), "--scheme", "W4G128", "-o", str(tmp_path / "a"), "--no-progress"]) == 0
    assert seen == []
    assert main([str(src), "--scheme", "W4G128", "-o", str(tmp_path / "b"), "--no-progress", "--low-mem"]) == 0
    assert (heap._M_MMAP_THRESHOLD, 1 << 20) in seen


def test_streamed_runs_pin_the_threshold_by_algorithm():
    """Streamed: layer algorithms map every tensor of 1 MiB or more, block algorithms (~4 MiB blocks of a Linear
    re-allocated every step) those of 8 MiB or more, --low-mem 1 MiB for all, data-free runs leave glibc alone."""
    from wq.algorithms import ALGORITHMS
    from wq.quantize import streamed_mmap_threshold

    get = ALGORITHMS.get
    assert streamed_mmap_threshold(get("rtn"), low_mem=False) is None
    assert streamed_mmap_threshold(get("gptq"), low_mem=False) == 1 << 20
    for block_algo in ("autoround", "recon", "awq"):
        assert streamed_mmap_threshold(get(block_algo), low_mem=False) == 8 << 20
        assert streamed_mmap_threshold(get(block_algo), low_mem=True) == 1 << 20
    assert streamed_mmap_threshold(get("rtn"), low_mem=True) == 1 << 20
