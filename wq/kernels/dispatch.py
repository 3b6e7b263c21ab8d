"""Kernel dispatch: kernels declare what they support as data; one function picks the best.

A kernel is chosen per (device type, activation dtype, bits, group size, sym, M) where M is the
number of activation rows (batch x tokens). `WQ_KERNEL=<name>` or `force_kernel(name)` pins one
(`reference` is ground truth); inside `with exact_kernels():` only kernels that multiply the activations
as given are picked (no int8 rounding of x), as calibration and eval need. The choice, and why the
better-ranked kernels were passed over, is logged once per key.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..packing import PackedWeight
from ..registry import Registry
from .reference import reference_matmul

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernel:
    """What a kernel can do, as data. `None` in a capability field means "any"."""

    name: str
    fn: Callable[..., Tensor]  # fn(x, pw, bias, state) -> y
    bits: frozenset[int] | None = None
    group_sizes: frozenset[int] | None = None  # -1 = per channel
    devices: frozenset[str] | None = None  # torch device types: "cpu", "cuda"
    dtypes: frozenset[torch.dtype] | None = None  # activation dtypes
    sym: bool | None = None  # True: symmetric only; None: both
    min_m: int = 1
    max_m: int | None = None
    priority: int = 0  # higher wins among the eligible
    available: Callable[[], bool] = field(default=lambda: True)
    # repack once per layer (at load time or first call) into the kernel's own layout; cached
    prepare: Callable[[PackedWeight], Any] | None = None
    layout: str | None = None  # kernels naming the same layout share one prepared copy (default: own name)
    needs_g_idx_free: bool = False  # True: cannot run act-order (permuted g_idx) weights
    fmts: frozenset[str] | None = frozenset({"int"})  # weight formats (QuantScheme.fmt); FP8 is "e4m3"/"e5m2"
    # (bits, min_m, max_m or None[, min_k]) where automatic dispatch picks this kernel, measured per bit width
    # (and, with min_k, only for layers with at least min_k input features); the first entry that matches the
    # bits and in_features wins. When given it replaces min_m/max_m (bits missing from it: only when forced)
    m_by_bits: tuple[tuple[int, ...], ...] | None = None
    # bind(pw, state) -> run(x, bias): a closure with everything per layer resolved once, for kernels whose
    # per-call Python work matters next to the kernel (CPU decode); default: fn with pw and state bound
    bind: Callable[[PackedWeight, Any], Callable[[Tensor, Tensor | None], Tensor]] | None = None
    # True: dequant(W) @ x with x as given (summation order aside); False: x is rounded first (int8
    # activations, or fp32 cast to bf16), close but not the reference, so `exact_kernels()` passes it over
    exact: bool = True

    def bound(self, pw: PackedWeight, state: Any) -> Callable[[Tensor, Tensor | None], Tensor]:
        if self.bind is not None:
            return self.bind(pw, state)
        fn = self.fn
        return lambda x, bias: fn(x, pw, bias, state)

    def m_range(self, bits: int, in_features: int = 0) -> tuple[int, int | None] | None:
        if self.m_by_bits is None:
            return self.min_m, self.max_m
        for entry in self.m_by_bits:
            min_k = entry[3] if len(entry) > 3 else 0
            if entry[0] == bits and in_features >= min_k:
                return entry[1], entry[2]
        return None

    def why_not(self, device: str, dtype: torch.dtype, pw: PackedWeight, m: int, *, any_m: bool = False) -> str | None:
        """None if this kernel can run the call, else the reason it cannot (any_m: ignore M ranges)."""
        s = pw.scheme
        if self.fmts is not None and s.fmt not in self.fmts:
            return f"{s.fmt} weights unsupported"
        if self.devices is not None and device not in self.devices:
            return f"device {device} not in {sorted(self.devices)}"
        if self.dtypes is not None and dtype not in self.dtypes:
            return f"dtype {dtype} unsupported"
        if self.bits is not None and s.bits not in self.bits:
            return f"{s.bits}-bit unsupported"
        if self.group_sizes is not None and s.group_size not in self.group_sizes:
            return f"group {s.group_size} unsupported"
        if self.sym is not None and s.sym != self.sym:
            return "asymmetric unsupported" if self.sym else "symmetric unsupported"
        rng = self.m_range(s.bits, pw.in_features)
        if not any_m:
            if rng is None:
                return f"not picked for {s.bits}-bit (only when forced)"
            if m < rng[0] or (rng[1] is not None and m > rng[1]):
                return f"M={m} outside [{rng[0]}, {rng[1]}]"
        if not self.exact and exact_only():
            return "rounds the activations (exact kernels required here)"
        if self.needs_g_idx_free and pw.g_idx is not None:
            return "act-order g_idx unsupported"
        if not self.available():
            return "backend not available"
        return None


KERNELS: Registry[Kernel] = Registry("kernel")
KERNELS.add(
    "reference",
    Kernel(name="reference", fn=lambda x, pw, bias, state: reference_matmul(x, pw, bias), priority=-100,
           fmts=None),
)

_forced: str | None = None


class _Mode(threading.local):
    """Per-thread dispatch mode (calibration in one thread must not change another thread's kernels)."""

    exact = False  # inside exact_kernels(); a class default keeps the read cheap (QuantLinear asks per call)


_mode = _Mode()

_logged: set[tuple] = set()
_memo: dict[tuple, Kernel] = {}


def force_kernel(name: str | None) -> None:
    """Pin one kernel for every call (None: back to automatic). Overrides WQ_KERNEL."""
    global _forced
    if name is not None:
        KERNELS.get(name)  # unknown names fail here, with a "did you mean"
    _forced = name


@contextmanager
def exact_kernels() -> Iterator[None]:
    """Within (on this thread): automatic dispatch picks only exact kernels (Kernel.exact). Calibration
    recomputes each quantized block's outputs for the next block, and those must not depend on which
    kernel wins at that M. A forced kernel still wins."""
    before = _mode.exact
    _mode.exact = True
    try:
        yield
    finally:
        _mode.exact = before


def exact_only() -> bool:
    """True inside exact_kernels() on the calling thread."""
    return _mode.exact


# os.environ.get costs ~1 us (key encoding); QuantLinear asks once per call, so read the mapping
# os.environ keeps in sync (bytes keys on POSIX) where there is one
_environ_bytes = getattr(os.environ, "_data", None) if os.name == "posix" else None


def forced_kernel() -> str | None:
    if _forced:
        return _forced
    if _environ_bytes is not None:
        v = _environ_bytes.get(b"WQ_KERNEL")
        return v.decode() if v else None
    return os.environ.get("WQ_KERNEL") or None


def select(x: Tensor, pw: PackedWeight) -> Kernel:
    """The best kernel for this call; falls back to the reference."""
    m = x.numel() // x.shape[-1] if x.numel() else 1
    device, dtype = x.device.type, x.dtype
    name = forced_kernel()
    if name:
        kernel = KERNELS.get(name)
        reason = kernel.why_not(device, dtype, pw, m, any_m=True)  # forcing overrides the measured M ranges
        if reason and name != "reference":
            raise RuntimeError(f"kernel {name!r} was forced (WQ_KERNEL / force_kernel) but cannot run: {reason}")
        return kernel
    memo_key = (device, dtype, pw.scheme, pw.in_features, pw.g_idx is None, m, exact_only(),
                tuple(map(id, KERNELS._items.values())))
    hit = _memo.get(memo_key)  # a decode step calls select once per layer: keep it off the hot path
    if hit is not None:
        return hit
    _memo[memo_key] = kernel = _rank(pw, m, device, dtype)
    return kernel


def _rank(pw: PackedWeight, m: int, device: str, dtype: torch.dtype) -> Kernel:
    ranked = sorted((KERNELS.get(n) for n in KERNELS), key=lambda k: -k.priority)
    passed = []
    for kernel in ranked:
        reason = kernel.why_not(device, dtype, pw, m)
        if reason is None:
            key = (device, dtype, str(pw.scheme), kernel.name)
            if key not in _logged:
                _logged.add(key)
                skipped = "; ".join(f"{n}: {r}" for n, r in passed) or "none"
                log.info("kernel %s for %s %s on %s (passed over: %s)", kernel.name, pw.scheme, dtype,
                         device, skipped)
            return kernel
        passed.append((kernel.name, reason))
    return KERNELS.get("reference")


def prepared(kernel: Kernel, pw: PackedWeight, cache: dict | None) -> Any:
    """The kernel's repacked copy of pw (None when the kernel needs none); `cache` keeps one per layout."""
    if kernel.prepare is None:
        return None
    if cache is None:
        return kernel.prepare(pw)
    key = kernel.layout or kernel.name
    if key not in cache:  # prepare may return None (the layer then runs on the reference): once
        cache[key] = kernel.prepare(pw)
    return cache[key]


def matmul(x: Tensor, pw: PackedWeight, bias: Tensor | None = None, cache: dict | None = None) -> Tensor:
    """y = x @ dequant(W)^T (+ bias) with the selected kernel; `cache` keeps repacked weights per kernel."""
    kernel = select(x, pw)
    return kernel.fn(x, pw, bias, prepared(kernel, pw, cache))


def plan(x: Tensor, pw: PackedWeight, cache: dict | None = None) -> Callable[[Tensor, Tensor | None], Tensor]:
    """matmul with the kernel choice and its prepared weights bound once: `run(x, bias)` for calls
    shaped like x (same device, dtype and M). What QuantLinear keeps per call shape in eager inference."""
    kernel = select(x, pw)
    return kernel.bound(pw, prepared(kernel, pw, cache))
