"""Triton kernels vs the torch reference: on CUDA when present, else under Triton's interpreter on CPU.

The interpreter (TRITON_INTERPRET=1, set here before triton is imported) is slow: shapes are
small but keep the edges that matter (N not a multiple of the tile, K not a multiple of 32 or of
the group, partial last groups, split-K, act-order g_idx).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit decoration
pytest.importorskip("triton")

from wq.kernels import KERNELS, triton_backend  # noqa: E402
from wq.kernels import triton_dequant as tdq  # noqa: E402
from wq.kernels import triton_matmul as tmm  # noqa: E402
from wq.kernels.reference import reference_matmul  # noqa: E402
from wq.kernels.triton_layout import prepare_triton, split_3bit_planes  # noqa: E402
from wq.packing import PackedWeight  # noqa: E402
from wq.primitives import minmax_qparams, quantize  # noqa: E402
from wq.scheme import QuantScheme  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BITS = (2, 3, 4, 8)
GROUPS = (-1, 32, 64, 128, 256)


def make_packed(bits: int, group: int, n: int, k: int, *, sym: bool = False, act_order: bool = False,
                seed: int = 0) -> PackedWeight:
    gen = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(bits=bits, group_size=group, sym=sym)
    w = torch.randn(n, k, generator=gen)
    g_idx = None
    if act_order:  # a permuted group assignment, as GPTQ desc_act writes it
        perm = torch.randperm(k, generator=gen)
        g_idx = (perm // scheme.group_for(k)).to(torch.int32)
    scale, zero = minmax_qparams(w, scheme)
    q = quantize(w, scale, zero, scheme)
    return PackedWeight.from_codes(q, scale, zero, scheme, g_idx=g_idx).to(DEVICE)


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, pw: PackedWeight, bias=None) -> None:
    """Kernel output vs the reference in fp32, within a few output-dtype ulps.

    Four, not two: split-K partial sums and the bf16 rounding of dequantized tiles each cost up to
    about one ulp of the largest output, and one run on a loaded machine landed just past two.
    """
    ref = reference_matmul(x.float(), pw, None if bias is None else bias.float())
    eps = torch.finfo(x.dtype).eps
    scale = ref.abs().max().item()
    assert y.dtype == x.dtype and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref, rtol=4 * eps, atol=4 * eps * scale)


def test_3bit_planes_roundtrip():
    codes = torch.randint(0, 8, (70, 5))
    lo, hi = split_3bit_planes(codes)
    assert lo.shape == (6, 5) and hi.shape == (3, 5) and lo.dtype == torch.int32
    k = torch.arange(70)
    lo64, hi64 = lo.long() & 0xFFFFFFFF, hi.long() & 0xFFFFFFFF
    back = ((lo64[k // 16] >> (2 * (k % 16))[:, None]) & 3) | (((hi64[k // 32] >> (k % 32)[:, None]) & 1) << 2)
    assert torch.equal(back, codes)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_exact(bits, group):
    """Every code, scale and zero lands where the reference puts it (fp32, bit-exact); K=576 as SmolLM2."""
    pw = make_packed(bits, group, n=40, k=576, sym=(bits == 4))  # sym at 4 bits: the constant-zero path
    w = tdq.dequantize_kn(prepare_triton(pw), torch.float32)
    assert torch.equal(w, pw.dequantize(torch.float32).t())


# Each (bits, group) weight meets every kernel path at one M and dtype; the set covers all M regimes.
PATHS = [("gemv", 1, torch.float16), ("gemv", 13, torch.bfloat16), ("gemm", 33, torch.float16),
         ("dequant", 20, torch.bfloat16)]
FNS = {"gemv": tmm.gemv, "gemm": tmm.gemm, "dequant": tdq.dequant_matmul}


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_kernels_match_reference(bits, group):
    pw = make_packed(bits, group, n=72, k=200, seed=bits * 1000 + group)  # N, K off every tile size
    tw = prepare_triton(pw)
    for i, (path, m, dtype) in enumerate(PATHS):
        x = torch.randn(m, 200, generator=torch.Generator().manual_seed(i)).to(DEVICE, dtype)
        assert_matches_reference(FNS[path](x, tw), x, pw)


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_bias_and_batch_dims(bits):
    """Permuted g_idx (scale gather), bias, a 3-D input; through each path."""
    pw = make_packed(bits, 32, n=40, k=96, act_order=True)
    assert pw.g_idx is not None
    tw = prepare_triton(pw)
    bias = torch.randn(40).to(DEVICE, torch.float16)
    x = torch.randn(2, 3, 96).to(DEVICE, torch.float16)
    for fn in FNS.values():
        assert_matches_reference(fn(x, tw, bias), x, pw, bias)


@pytest.mark.parametrize(("split_k", "block_k", "group"), [(1, 32, 32), (3, 64, 32), (2, 64, 64), (5, 32, 128)])
def test_split_k_and_block_configs(split_k, block_k, group):
    """Explicit split-K counts and BLOCK_K > group (scale rows broadcast inside a tile)."""
    pw = make_packed(4, group, n=33, k=320, sym=False)
    tw = prepare_triton(pw)
    x = torch.randn(5, 320).to(DEVICE, torch.float16)
    y = tmm.launch(x, tw, None, block_m=16, block_n=32, block_k=block_k, split_k=split_k, num_warps=4,
                   num_stages=1)
    assert_matches_reference(y, x, pw)


def test_dispatch_ranks_triton_paths_by_m(monkeypatch):
    """With triton usable, CUDA calls go gemv (M<=16) -> gemm -> dequant+cuBLAS (M>1024); CPU never."""
    monkeypatch.setattr(triton_backend, "why_unavailable", lambda: None)
    pw = make_packed(4, 128, n=8, k=128)

    def best(device, m, dtype=torch.float16):
        ok = [KERNELS.get(n) for n in KERNELS if KERNELS.get(n).why_not(device, dtype, pw, m) is None]
        return max(ok, key=lambda k: k.priority).name

    assert [best("cuda", m) for m in (1, 16, 17, 1024, 1025, 4096)] == [
        "triton_gemv", "triton_gemv", "triton_gemm", "triton_gemm", "triton_dequant", "triton_dequant"]
    assert best("cuda", 1, torch.float32) == "reference"
    assert not best("cpu", 1).startswith("triton")


def test_triton_not_imported_by_wq_and_unavailability_is_explained():
    code = ("import sys, wq, wq.nn, wq.kernels; assert 'triton' not in sys.modules, 'triton imported';"
            "from wq.kernels import triton_backend as t; print(t.why_unavailable())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not torch.cuda.is_available():
        assert "no CUDA device" in out.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", BITS)
def test_gpu_quant_linear_dispatch_and_cuda_graph(bits):
    """On a GPU: QuantLinear picks a Triton kernel per M, matches the reference, and replays in a CUDA graph."""
    from wq.kernels import dispatch
    from wq.nn.quant_linear import QuantLinear

    pw = make_packed(bits, 128, n=512, k=576)
    layer = QuantLinear.from_packed(pw).cuda()
    for m, name in ((1, "triton_gemv"), (64, "triton_gemm"), (2048, "triton_dequant")):
        x = torch.randn(m, 576, device="cuda", dtype=torch.bfloat16)
        assert dispatch.select(x, pw).name == name
        assert_matches_reference(layer(x), x, pw)
    x = torch.randn(4, 576, device="cuda", dtype=torch.float16)
    layer(x)  # warm up: compile + repack outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert_matches_reference(y, x, pw)
