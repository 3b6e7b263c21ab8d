"""Triton kernels vs the torch reference: on CUDA when present, else under Triton's interpreter on CPU.

The interpreter (TRITON_INTERPRET=1, set here before triton is imported) runs the real tile
configurations of triton_configs (the sm90 rows; CPU tensors count as a 4-SM device so that split-K
runs). It is slow, so shapes are small but keep the edges that matter: N off every tile, K = 576
(partial last group at 128 and 256), K not a multiple of 32, act-order, split-K.
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

from wq.kernels import KERNELS, triton_backend, triton_configs  # noqa: E402
from wq.kernels import triton_dequant as tdq  # noqa: E402
from wq.kernels import triton_matmul as tmm  # noqa: E402
from wq.kernels.reference import reference_matmul  # noqa: E402
from wq.kernels.triton_launch import WeightMeta  # noqa: E402
from wq.kernels.triton_layout import act_order_perm, prepare_triton, split_3bit_planes  # noqa: E402
from wq.packing import PackedWeight  # noqa: E402
from wq.primitives import minmax_qparams, quantize  # noqa: E402
from wq.scheme import QuantScheme  # noqa: E402

pytestmark = pytest.mark.kernels  # dispatch picks fast kernels here (see conftest)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BITS = (2, 3, 4, 8)
GROUPS = (-1, 32, 64, 128)


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
    """Kernel output vs the reference in fp32, within a few output-dtype ulps of the largest output
    (fp32 sums in another order, then one rounding to the output dtype)."""
    ref = reference_matmul(x.float(), pw, None if bias is None else bias.float())
    eps = torch.finfo(x.dtype).eps
    scale = ref.abs().max().item()
    assert y.dtype == x.dtype and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref, rtol=2 * eps, atol=2 * eps * scale)


def test_3bit_planes_roundtrip():
    codes = torch.randint(0, 8, (70, 5))
    lo, hi = split_3bit_planes(codes)
    assert lo.shape == (6, 5) and hi.shape == (3, 5) and lo.dtype == torch.int32
    k = torch.arange(70)
    lo64, hi64 = lo.long() & 0xFFFFFFFF, hi.long() & 0xFFFFFFFF
    back = ((lo64[k // 16] >> (2 * (k % 16))[:, None]) & 3) | (((hi64[k // 32] >> (k % 32)[:, None]) & 1) << 2)
    assert torch.equal(back, codes)


def test_act_order_is_one_permutation_of_k():
    """GPTQ desc_act g_idx sorts into whole groups; the prepared codes are the original ones permuted."""
    pw = make_packed(4, 32, n=8, k=96, act_order=True)
    perm, regular = act_order_perm(pw.g_idx, 32)
    assert regular and torch.equal(pw.g_idx.long()[perm], torch.arange(96) // 32)
    tw = prepare_triton(pw)
    assert torch.equal(tw.perm.long(), perm.to(tw.perm.device))
    sorted_pw = PackedWeight(tw.qweight, pw.scales, pw.zeros, pw.scheme, 96, 8)  # plain groups, sorted K
    assert torch.equal(sorted_pw.codes(), pw.codes()[:, perm])
    irregular = make_packed(4, 32, n=8, k=96)
    irregular.g_idx = torch.tensor([0] * 40 + [1] * 24 + [2] * 32, dtype=torch.int32)  # groups of 40/24/32
    assert prepare_triton(irregular) is None


@pytest.mark.parametrize("group", GROUPS + (256,))
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_exact(bits, group):
    """Every code, scale and zero lands where the reference puts it (fp32, bit-exact); K=576 as SmolLM2
    (partial last group at 128 and 256); act-order rows land at their original input index."""
    pw = make_packed(bits, group, n=40, k=576, sym=(bits == 4), act_order=group in (32, 256))
    w = tdq.dequantize_kn(prepare_triton(pw), torch.float32)
    assert torch.equal(w, pw.dequantize(torch.float32).t())


# every (bits, group) meets sym/asym x act-order through the GEMV at M=1 and at a larger M, and the
# GEMM; M and dtypes rotate across the grid. K = 192: a partial last group at 128 (K = 576, the
# SmolLM2 width, is in test_dequantize_exact and test_smollm2_width)
M_GEMV = (2, 3, 5, 8)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_kernels_match_reference(bits, group):
    i = BITS.index(bits) * len(GROUPS) + GROUPS.index(group)
    for j, (sym, act_order) in enumerate(((True, False), (False, True), (False, False), (True, True))):
        if j >= 2 and i % 2:  # all four combinations on every other (bits, group); two on the rest
            continue
        dtype = (torch.float16, torch.bfloat16)[(i + j) % 2]
        gen = torch.Generator().manual_seed(i * 10 + j)
        pw = make_packed(bits, group, n=72, k=192, sym=sym, act_order=act_order, seed=i * 10 + j)
        tw = prepare_triton(pw)
        for m, fn in ((1, tmm.gemv), (M_GEMV[(i + j) % 4], tmm.gemv), (9 + 24 * (j % 2), tmm.gemm)):
            x = torch.randn(m, 192, generator=gen).to(DEVICE, dtype)
            assert_matches_reference(fn(x, tw), x, pw)


def test_smollm2_width():
    """K = 576, N = 192 (SmolLM2's k_proj): partial last group, split-K over 9 steps, every path."""
    pw = make_packed(4, 128, n=192, k=576, sym=True)
    tw = prepare_triton(pw)
    for m, fn in ((1, tmm.gemv), (40, tmm.gemm), (3, tdq.dequant_matmul)):
        x = torch.randn(m, 576).to(DEVICE, torch.bfloat16)
        assert_matches_reference(fn(x, tw), x, pw)


@pytest.mark.parametrize("bits", [3, 4])
def test_bias_batch_dims_and_k_off_32(bits):
    """K = 200 (not a multiple of 32), bias, a 3-D input; every path, act-order on one weight."""
    for act_order in (False, True):
        pw = make_packed(bits, 64, n=40, k=200, act_order=act_order)
        tw = prepare_triton(pw)
        bias = torch.randn(40).to(DEVICE, torch.float16)
        x = torch.randn(1, 3, 200).to(DEVICE, torch.float16)
        for fn in (tmm.gemv, tmm.gemm, tdq.dequant_matmul):
            assert_matches_reference(fn(x, tw, bias), x, pw, bias)


@pytest.mark.parametrize("splits", [1, 3])
def test_split_k_is_reproducible(splits):
    """Explicit split counts give the reference, the same bits on every call, and leave the tickets at 0."""
    pw = make_packed(4, 32, n=300, k=160)  # 2 output tiles of 256 columns, 5 K steps of 32
    tw = prepare_triton(pw)
    x = torch.randn(2, 160).to(DEVICE, torch.float16)
    bias = torch.randn(300).to(DEVICE, torch.float16)
    y = tmm.gemv(x, tw, bias, splits=splits)
    assert_matches_reference(y, x, pw, bias)
    assert torch.equal(tmm.gemv(x, tw, bias, splits=splits), y)
    assert all(int(t.abs().sum()) == 0 for t in tmm._tickets.values())


def test_gemv_serves_more_rows_when_forced():
    pw = make_packed(2, 128, n=40, k=128)
    x = torch.randn(11, 128).to(DEVICE, torch.float16)  # 8 + 3 rows
    assert_matches_reference(tmm.gemv(x, prepare_triton(pw)), x, pw)


def test_plans_follow_the_config_table():
    """The launchers take tiles only from CONFIGS; the GEMV's K step divides the group and shrinks
    with the rows; split-K stays within its bounds."""
    cfg = triton_configs.config("sm90", "gemv", 4)
    meta = WeightMeta(bits=4, group=32, in_features=4096, out_features=4096, const_zero=8, act_order=False)
    launch, splits = tmm.plan_gemv(meta, 1, torch.bfloat16, cfg, sms=132)
    c = launch.constexprs
    assert (c["BLOCK_N"], launch.num_warps) == (cfg.block_n, cfg.num_warps) and c["BLOCK_K"] == 32  # 32 | G
    assert 1 < splits <= 64 and launch.grid == (4096 // cfg.block_n, splits)
    assert launch.ints["k_per_split"] * splits >= 4096 > launch.ints["k_per_split"] * (splits - 1)
    meta128 = WeightMeta(4, 128, 4096, 4096, 8, False)
    assert tmm.plan_gemv(meta128, 1, torch.bfloat16, cfg, 132)[0].constexprs["BLOCK_K"] == cfg.block_k
    assert tmm.plan_gemv(meta128, 8, torch.bfloat16, cfg, 132)[0].constexprs["BLOCK_K"] * 8 // 8 <= 32
    wide = WeightMeta(4, 128, 4096, 28672, 8, False)  # many output tiles: fewer splits
    assert tmm.plan_gemv(wide, 1, torch.bfloat16, cfg, 132)[1] < splits
    g = tmm.plan_gemm(meta128, 64, torch.bfloat16, triton_configs.config("sm86", "gemm_s", 4))
    assert g.constexprs["BLOCK_M"] == triton_configs.config("sm86", "gemm_s", 4).block_m
    with pytest.raises(ValueError, match="up to 8 rows"):
        tmm.plan_gemv(meta, 9, torch.bfloat16, cfg, 132)


def test_config_table_covers_every_family_path_and_bits():
    for fam in triton_configs.FAMILIES:
        for path in triton_configs.PATHS:
            for bits in triton_configs.BITS:
                cfg = triton_configs.config(fam, path, bits)
                unit = 16 if bits == 3 else 32 // bits
                assert cfg.block_k % unit == 0 and cfg.block_n % 32 == 0
                if path == "gemv":  # 4 columns per thread, the K sums in registers
                    assert cfg.block_n == 4 * 32 * cfg.num_warps and cfg.block_m == 8
    assert {t.family for t in triton_configs.TARGETS.values()} <= set(triton_configs.FAMILIES)
    assert triton_configs.family_for((8, 0)) == "sm80" and triton_configs.family_for((8, 9)) == "sm86"
    assert triton_configs.family_for((9, 0)) == "sm90" and triton_configs.family_for((12, 0)) == "sm86"
    with pytest.raises(KeyError, match="add a row"):
        triton_configs.config("sm70", "gemv", 4)


def test_dispatch_ranks_triton_paths_by_m(monkeypatch):
    """With triton usable, CUDA calls go gemv (M<=8) -> gemm -> dequant+cuBLAS (M>1024); CPU never."""
    monkeypatch.setattr(triton_backend, "why_unavailable", lambda: None)
    pw = make_packed(4, 128, n=8, k=128)

    def best(device, m, dtype=torch.float16):
        ok = [KERNELS.get(n) for n in KERNELS if KERNELS.get(n).why_not(device, dtype, pw, m) is None]
        return max(ok, key=lambda k: k.priority).name

    assert [best("cuda", m) for m in (1, 8, 9, 1024, 1025, 4096)] == [
        "triton_gemv", "triton_gemv", "triton_gemm", "triton_gemm", "triton_dequant", "triton_dequant"]
    assert best("cuda", 1, torch.float32) == "reference"
    assert not best("cpu", 1).startswith("triton")


def test_irregular_act_order_runs_the_reference():
    pw = make_packed(4, 32, n=8, k=96)
    pw.g_idx = torch.tensor([0] * 40 + [1] * 24 + [2] * 32, dtype=torch.int32).to(DEVICE)
    x = torch.randn(2, 96).to(DEVICE, torch.float16)
    state = KERNELS.get("triton_gemv").prepare(pw)
    assert state is None
    torch.testing.assert_close(triton_backend.gemv(x, pw, None, state), reference_matmul(x, pw))


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
    for m, name in ((1, "triton_gemv"), (8, "triton_gemv"), (64, "triton_gemm"), (2048, "triton_dequant")):
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_split_k_is_bitwise_deterministic():
    """The split-K GEMV sums partials in split order whatever order the splits finish in."""
    pw = make_packed(4, 128, n=4096, k=4096)
    tw = prepare_triton(pw)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ys = [tmm.gemv(x, tw) for _ in range(20)]
    assert all(torch.equal(y, ys[0]) for y in ys)
    assert_matches_reference(ys[0], x, pw)
