"""wq's own AVX2 kernels for 2/3/4/8-bit weights (C++ torch extension), three ways over one layout:
`cpu_avx2_i8` (int8-rounded activations, integer dot products: decode), `cpu_avx2` (fp32 activations
and FMA) and `cpu_avx2_dq` (dequantized fp32 tiles + torch's GEMM: prefill).

The extension (csrc/cpu_gemv.cpp) is compiled with the machine's compiler on first use ("compiling CPU
kernels (once)") into <wq cache>/kernels/cpu_gemv-<hash of source, flags, torch, python>/ and imported
from there by every later process, test run and checkout; when it cannot build, the kernel reports
itself unavailable (logged once with the reason) and dispatch falls back to the aten kernels or the
reference. `WQ_NO_NATIVE=1` skips the build.

Weights are repacked once per layer at their real width (4-bit nibbles interleaved, 2-bit crumbs,
3-bit as a 2-bit plane plus a 1-bit plane, 8-bit bytes; see the .cpp for the exact byte layout),
rows of W are split over torch's intra-op threads (the extension is built with OpenMP for that).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..packing import PackedWeight
from ..primitives import row_chunks
from .cpu_aten import _act_order_perm, _ceil_to
from .dispatch import KERNELS, Kernel
from .reference import reference_matmul

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_gemv.cpp"
_ext = None
_PREPARE_CHUNK = 1 << 20  # weights per row chunk when repacking a layer
_failed: str | None = None


CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def build_key() -> str:
    """What the compiled module depends on: the source, the flags, torch and Python. The same key means the same
    binary, whichever checkout or process asks for it."""
    import hashlib
    import sys

    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(repr((CFLAGS, LDFLAGS, torch.__version__, sys.version_info[:2], sys.platform)).encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    """<wq cache>/kernels/cpu_gemv-<key>: one build per machine, shared by tests, CLI runs and every checkout."""
    from ..assets import cache_dir

    return cache_dir() / "kernels" / f"cpu_gemv-{build_key()}"


def _import(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(name: str, d: Path):
    """Compile into `d` from a copy of the source kept there (the build then never depends on which checkout
    asked: torch's ninja files record the source path). torch's own lock serialises concurrent builds."""
    import shutil

    from torch.utils.cpp_extension import load

    d.mkdir(parents=True, exist_ok=True)
    src = d / SOURCE.name
    if not src.exists() or src.read_bytes() != SOURCE.read_bytes():
        shutil.copyfile(SOURCE, src)
    log.warning("compiling CPU kernels (once per machine, about a minute; cached in %s)", d)
    # -fopenmp: at::parallel_for is an OpenMP region compiled into the extension itself; without the flag its
    # pragma is ignored and every kernel runs on one thread whatever torch's setting
    # copies: load() appends to the flag lists it is given
    return load(name=name, sources=[str(src)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                build_directory=str(d), verbose=False)


def extension():
    """The compiled extension module, or None when it cannot be built here (reason logged once). Built once per
    machine into build_dir() and imported from there afterwards (no compiler or ninja run)."""
    global _ext, _failed
    if _ext is not None or _failed is not None:
        return _ext
    if os.environ.get("WQ_NO_NATIVE"):
        _failed = "WQ_NO_NATIVE is set"
    elif torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        _failed = f"CPU capability {torch.backends.cpu.get_cpu_capability()} lacks AVX2"
    else:
        try:
            d = build_dir()
            name = f"wq_cpu_gemv_{build_key()}"
            built = d / f"{name}.so"
            _ext = _import(name, built) if built.exists() else _build(name, d)
        except Exception as e:  # compiler missing or failing: the kernel is unavailable, said once
            _failed = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
    if _failed is not None:
        log.warning("cpu_avx2 kernel unavailable (%s); CPU layers use the aten/reference kernels", _failed)
    return _ext


def available() -> bool:
    return extension() is not None


# 3-bit: where code j's third bit sits in its block's 32-bit plane (the kernel shifts dword d of the
# broadcast plane right by d, so byte i of dword d must find code 4d + i's bit at bit 0)
PLANE_BIT = 8 * (torch.arange(32) % 4) + torch.arange(32) // 4


def pack_rows(q: Tensor, bits: int) -> Tensor:
    """Codes int [N, Kp] (Kp % 32 == 0) -> uint8 [N, Kp/32 * block_bytes] in the kernel's layout."""
    n, kp = q.shape
    b = q.to(torch.uint8).reshape(n, kp // 32, 32)  # [N, blocks, 32]
    if bits == 8:
        out = b
    elif bits == 4:
        out = b[..., :16] | (b[..., 16:] << 4)  # byte j: code j, code j+16
    else:
        lo = b & 3
        crumbs = lo[..., 0:8] | (lo[..., 8:16] << 2) | (lo[..., 16:24] << 4) | (lo[..., 24:32] << 6)
        if bits == 2:
            out = crumbs
        else:  # 3-bit: + 32-bit plane of bit 2, little endian, code j's bit at 8 * (j % 4) + j // 4
            hi = ((b >> 2) & 1).to(torch.int64)
            plane = (hi << PLANE_BIT).sum(-1)  # [N, blocks]
            plane_bytes = torch.stack([(plane >> (8 * i)) & 0xFF for i in range(4)], -1).to(torch.uint8)
            out = torch.cat([crumbs, plane_bytes], -1)
    return out.reshape(n, -1).contiguous()


def unpack_rows(w: Tensor, bits: int) -> Tensor:
    """Inverse of pack_rows: uint8 [N, Kp/32 * block_bytes] -> int32 codes [N, Kp]."""
    n = w.shape[0]
    b = w.reshape(n, -1, {8: 32, 4: 16, 3: 12, 2: 8}[bits]).to(torch.int32)  # [N, blocks, block_bytes]
    if bits == 8:
        q = b
    elif bits == 4:
        q = torch.cat([b & 15, b >> 4], -1)
    else:
        crumbs = b[..., :8]
        q = torch.cat([(crumbs >> s) & 3 for s in (0, 2, 4, 6)], -1)
        if bits == 3:
            plane = sum(b[..., 8 + i] << (8 * i) for i in range(4))  # [N, blocks] int32 (bit 31 wraps: masked below)
            q = q | (((plane[..., None] >> PLANE_BIT) & 1) << 2)
    return q.reshape(n, -1)


@dataclass
class NativeState:
    w: Tensor  # uint8 [N, Kp/32 * block_bytes]
    scales: Tensor  # fp32 [N, n_groups]
    zs: Tensor  # fp32 [N, n_groups]: zero * scale
    group: int  # multiple of 32 (per channel: Kp)
    k_pad: int
    perm: Tensor | None
    zeros: Tensor  # uint8 [N, n_groups]: the exact zero points (to give the checkpoint tensors back)

    def to_packed(self, shell: PackedWeight) -> PackedWeight:
        """The checkpoint tensors rebuilt exactly from this layout (shell: scheme, shapes, g_idx)."""
        k = shell.in_features
        codes = unpack_rows(self.w, shell.scheme.bits)[:, :k]
        if self.perm is not None:
            codes = codes[:, torch.argsort(self.perm)]
        return PackedWeight.from_codes(codes, self.scales.half().float(), self.zeros.float(), shell.scheme,
                                       g_idx=shell.g_idx)


def prepare_native(pw: PackedWeight) -> NativeState | None:
    n, k = pw.out_features, pw.in_features
    bits = pw.scheme.bits
    group = pw.group
    if pw.scheme.group_size != -1 and group % 32:
        return None
    perm = _act_order_perm(pw, group)
    if perm is False:
        log.warning("cpu_avx2: act-order g_idx with uneven groups; this layer runs on the reference")
        return None
    kp = _ceil_to(k, 32)
    if pw.scheme.group_size == -1:
        group = kp
    packed = []
    for r0, r1 in row_chunks(n, kp, _PREPARE_CHUNK):  # a whole weight's int32 codes: 4x its fp32 size in temporaries
        q = pw.rows(r0, r1).codes().cpu()
        if perm is not None:
            q = q[:, perm]
        codes = torch.zeros(r1 - r0, kp, dtype=torch.int32)
        codes[:, :k] = q  # padded channels meet zero-padded activations
        packed.append(pack_rows(codes, bits))  # rows are packed independently
    z = pw.zeros.float().cpu().t()  # [N, n_groups]
    s = pw.scales.float().cpu().t().contiguous()
    return NativeState(torch.cat(packed) if len(packed) > 1 else packed[0], s, (z * s).contiguous(), group, kp - k,
                       perm, pw.zeros.cpu().t().contiguous())


def _run(x: Tensor, pw: PackedWeight, bias: Tensor | None, state: NativeState | None, fn_name: str) -> Tensor:
    return _bind_gemv(fn_name)(pw, state)(x, bias)


def native_matmul(x: Tensor, pw: PackedWeight, bias: Tensor | None, state: NativeState | None) -> Tensor:
    """fp32 activations and accumulation: the reference's math up to summation order."""
    return _run(x, pw, bias, state, "gemv")


def native_i8_matmul(x: Tensor, pw: PackedWeight, bias: Tensor | None, state: NativeState | None) -> Tensor:
    """Activations rounded to int8 per segment of <= 128 input channels (one fp32 scale each, as
    llama.cpp's Q8 activations), integer dot products, fp32 scaling: ~4x fewer instructions per
    weight than the fp32 kernel. Equals the reference applied to the int8-rounded activations."""
    return _run(x, pw, bias, state, "gemv_i8")


def _bind_gemv(fn_name: str):
    """bind(pw, state) for gemv / gemv_i8 / gemm_dq: run(x, bias) with the layer's constants bound once. A decode
    step calls every layer once per token, and on small layers (SmolLM2's 192x576: ~10 us dense) every
    tensor op issued from Python costs a visible share, so the extension takes x as it comes ([..., K],
    any float dtype) and does the cast, act-order permutation, padding, bias and output shape itself."""

    def bind(pw: PackedWeight, state: NativeState | None):
        if state is None:
            return lambda x, bias: reference_matmul(x, pw, bias)
        fn = getattr(extension(), fn_name)
        args = (state.w, state.scales, state.zs, pw.scheme.bits, state.group, pw.in_features + state.k_pad, state.perm)
        return lambda x, bias: fn(x, *args, bias)

    return bind


def native_dq_matmul(x: Tensor, pw: PackedWeight, bias: Tensor | None, state: NativeState | None) -> Tensor:
    """Large M: tiles of rows dequantized to fp32 (AVX2, at most 8 MiB alive) times torch's fp32 GEMM, all
    in the extension. The reference's math up to summation order."""
    return _run(x, pw, bias, state, "gemm_dq")


# Where each path wins, measured (docs/cpu.md "Hand-over"; scripts/bench_cpu.py --part layers, 1 and 2
# threads, the 1B and SmolLM2 shapes, each kernel forced beside the automatic choice), as data: (bits, min M,
# max M[, min in_features]), first match wins. Automatic dispatch takes the highest-priority kernel whose range
# holds M, so:
# - cpu_avx2_i8 (int8 activations, priority 25): 2/3/4-bit through M = 512 (1.03x-2.28x dense on every shape
#   at M = 64-512; 3-bit 1.05x-1.74x since its codes are expanded once per chunk of W; measured no further);
#   8-bit through 256 on layers with K >= 1536 (0.98x-1.26x dense at M = 129-256 on the 1B shapes and
#   576x1536, where the GEMM route gave 0.93x-1.13x) and through 128 on narrower ones (K = 576: its sign
#   trick costs as many instructions as fp32 FMAs, and the GEMM route wins at 256: 0.90x-1.05x vs
#   0.86x-0.97x).
# - Inside `exact_kernels()` (calibration, eval) it is passed over, and the exact kernels' ranges apply:
#   cpu_avx2 (fp32 activations, FMA) through M = 16 (8 at 3-bit), above it dequantized tiles into torch's
#   fp32 GEMM (cpu_avx2_dq), which also takes every M past the int8 kernel's range.
# aten's int4/int8 ops lose to these at every M here (and round x to bf16): fallback only.
I8_M = ((2, 1, 512), (3, 1, 512), (4, 1, 512), (8, 1, 256, 1536), (8, 1, 128))
F32_M = ((2, 1, 16), (3, 1, 8), (4, 1, 16), (8, 1, 16))
DQ_M = ((2, 17, None), (3, 9, None), (4, 17, None), (8, 17, None))

_native = dict(prepare=prepare_native, bits=frozenset({2, 3, 4, 8}), devices=frozenset({"cpu"}), available=available,
               layout="cpu_avx2")
KERNELS.add("cpu_avx2_i8", Kernel(name="cpu_avx2_i8", fn=native_i8_matmul, m_by_bits=I8_M, priority=25,
                                  bind=_bind_gemv("gemv_i8"), exact=False, **_native))
KERNELS.add("cpu_avx2", Kernel(name="cpu_avx2", fn=native_matmul, m_by_bits=F32_M, priority=20,
                               bind=_bind_gemv("gemv"), **_native))
KERNELS.add("cpu_avx2_dq", Kernel(name="cpu_avx2_dq", fn=native_dq_matmul, m_by_bits=DQ_M, priority=15,
                                  bind=_bind_gemv("gemm_dq"), **_native))
