"""Give freed heap memory back to the operating system between blocks and shards.

glibc's malloc keeps freed chunks in its arenas for reuse. A run that quantizes thousands of small and
mid-sized tensors one after the other (per-expert projections, one block at a time) frees everything it
allocated, yet the process's resident memory grows with every block: the chunks are scattered across
arenas (one per thread that allocated) and the heap tops are pinned by a few live objects. Measured on a
random 64-expert, 8-layer Qwen3-MoE (459 MiB in bf16), model-free rtn peaked at 722-1229 MiB of RSS
with no tensor alive between shards, and at 464 MiB with `malloc_trim` after each source shard.

`Trimmer.tick(nbytes)` after each processed tensor calls `malloc_trim(0)` once `every` bytes were
processed since the last call; `trim()` calls it at once (after a block is released). The trim itself
is cheap, but the pages it returns are faulted in again (zeroed) by the next tensors: once rtn's
temporaries became small (a slice of rows at a time), trimming every 64 MiB cost 14% of a model-free
run's wall time and 3.3 vs 2.0 s of system time (16 blocks of hidden 2048, paired A/B (A B A B, whole-process CPU and peak RSS) against the
whole-model path, load 2-3: 1.14x with trims every 64 MiB, 1.06x every 512 MiB, 1.00x never). Without
trims the heap does grow between them (RssAnon +40 MiB per ~5 blocks of 32), so a 32-block run peaked
at 675 MiB trimming once per GiB and at 626 MiB every 256 MiB (620 every 64 MiB): 256 MiB it is. Both
do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl without it, Windows)
        return None


def trim() -> bool:
    """Return the heap's free pages to the OS now. True if the C library could."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False


class Trimmer:
    """Calls trim() once every `every` bytes of processed tensors."""

    def __init__(self, every: int = 256 << 20):
        self.every, self.since = every, 0

    def tick(self, nbytes: int) -> None:
        self.since += nbytes
        if self.since >= self.every:
            trim()
            self.since = 0


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameter numbers


@functools.cache
def _mallopt():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.mallopt
    except (OSError, AttributeError):
        return None


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30,
                      top_pad: int = 256 << 20) -> bool:
    """The opposite of trim(), for loops that free and re-allocate the same large buffers every step
    (the forwards of an evaluation): serve allocations up to `mmap_threshold` (glibc's ceiling is 32 MiB)
    from the heap and keep up to `trim_threshold` of freed memory there, instead of mapping fresh pages
    from the kernel (and faulting them in, zeroed) on every forward. Measured on the bundled model's eval
    (docs/eval.md, 3 A/B pairs): about half the minor page faults (4.5 M -> 2.1 M) and system time
    (7.8 -> 6.0 s per pair, 15-18 -> 7 s on longer runs); the wall-time change was within this shared
    machine's noise (A/B wall ratio 0.65-1.34). Costs resident memory (freed memory is kept), so the
    quantization paths, which hold one block at a time, do not use it. False where it is not glibc."""
    fn = _mallopt()
    if fn is None:
        return False
    return all(bool(fn(p, v)) for p, v in ((_M_MMAP_THRESHOLD, mmap_threshold),
                                            (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad)))


def return_freed_memory(mmap_threshold: int = 1 << 20) -> bool:
    """The other way round from keep_freed_memory, for --low-mem: every allocation of `mmap_threshold` bytes or
    more gets its own mapping, given back to the OS when it is freed (glibc otherwise raises the threshold to
    the largest chunk freed so far, up to 32 MiB, and serves weight-sized tensors from a heap that fragments).
    Measured (paired A/B, 3 pairs, streamed gptq on 2 blocks of hidden 2048, load 2.2-2.8): peak RSS 1379 ->
    1243 MiB, +8.6% wall time (system time 4.5 -> 9.1 s: every large allocation is faulted in afresh).
    False where it is not glibc."""
    fn = _mallopt()
    return fn is not None and bool(fn(_M_MMAP_THRESHOLD, mmap_threshold))
