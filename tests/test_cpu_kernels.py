"""CPU kernels (aten int4/int8, wq's AVX2 extension) against the reference, and the CPU dispatch."""

from __future__ import annotations

import zlib

import pytest
import torch

from wq.kernels import KERNELS, cpu_native, force_kernel, select
from wq.kernels.dispatch import exact_kernels
from wq.kernels.reference import reference_matmul
from wq.nn import QuantLinear
from wq.packing import PackedWeight
from wq.scheme import QuantScheme

pytestmark = pytest.mark.kernels  # dispatch picks fast kernels here (see conftest)

SHAPES = [(40, 576), (33, 100), (16, 64)]  # (out, in): partial last group, odd both ways, tiny
SCHEMES_LOW = ["W4G128", "W4G-1", "W4G32-asym", "W3G128", "W3G64-sym", "W2G128", "W2G-1"]
SCHEMES_8 = ["W8", "W8-asym"]


def random_packed(out_f: int, in_f: int, scheme: str, seed: int, act_order: bool = False) -> PackedWeight:
    s = QuantScheme.parse(scheme)
    gen = torch.Generator().manual_seed(seed)
    ng, maxq = s.n_groups(in_f), 2**s.bits - 1
    q = torch.randint(0, maxq + 1, (out_f, in_f), generator=gen)
    scale = torch.rand(out_f, ng, generator=gen) * 0.02 + 1e-3
    zero = torch.full((out_f, ng), 2 ** (s.bits - 1)) if s.sym else torch.randint(0, maxq + 1, (out_f, ng), generator=gen)
    g_idx = None
    if act_order:  # GPTQ act-order: a permutation of the input channels, groups of G in permuted order
        perm = torch.randperm(in_f, generator=gen)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // s.group_for(in_f)).to(torch.int32)
    return PackedWeight.from_codes(q, scale, zero, s, g_idx=g_idx)


def stable_seed(*parts) -> int:
    """A seed from the test's parameters that is the same in every run (hash() of a str is salted)."""
    return zlib.crc32(repr(parts).encode()) % 1000


def run_kernel(name: str, x: torch.Tensor, pw: PackedWeight, bias=None) -> torch.Tensor:
    k = KERNELS.get(name)
    reason = k.why_not("cpu", x.dtype, pw, x.numel() // x.shape[-1], any_m=True)
    assert reason is None, reason  # tests may go past the dispatch M ranges
    return k.fn(x, pw, bias, k.prepare(pw))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def test_native_extension_builds():
    """The AVX2 extension must build on every x86 machine with a compiler (CI included)."""
    assert cpu_native.available(), "cpu_avx2 extension did not build: see the warning logged above"


def test_native_extension_is_built_once_and_reused(monkeypatch):
    """Once built (above), another process imports the cached module: no compiler, no 'compiling' message."""
    import subprocess
    import sys

    assert cpu_native.available()
    key = cpu_native.build_key()
    assert (cpu_native.build_dir() / f"wq_cpu_gemv_{key}.so").exists() and key in cpu_native.build_dir().name
    code = "from wq.kernels import cpu_native as c; assert c.extension() is not None; print(c.extension().__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "compiling" not in out.stderr and str(cpu_native.build_dir()) in out.stdout
    monkeypatch.setattr(cpu_native, "_ext", None)
    monkeypatch.setattr(cpu_native, "_build", lambda *a: pytest.fail("rebuilt although the module is cached"))
    assert cpu_native.extension() is not None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_rows_round_trip(bits):
    q = torch.randint(0, 2**bits, (5, 13 * 32), generator=torch.Generator().manual_seed(bits))
    w = cpu_native.pack_rows(q, bits)
    assert w.dtype == torch.uint8 and w.shape == (5, 13 * {2: 8, 3: 12, 4: 16, 8: 32}[bits])
    assert torch.equal(cpu_native.unpack_rows(w, bits), q)


@pytest.mark.parametrize("scheme", SCHEMES_LOW + SCHEMES_8 + ["W8G64", "W3G256"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("name", ["cpu_avx2", "cpu_avx2_dq"])
def test_native_matches_reference(scheme, shape, m, name):
    """The fp32 kernels: fp32 activations and accumulation (cpu_avx2_dq: dequantized tiles + torch GEMM)."""
    pw = random_packed(*shape, scheme, seed=stable_seed(scheme, shape, m))
    lead = (1,) if m == 1 else (2, m)  # leading batch dims are kept; M = 1, 6, 16
    x = torch.randn(*lead, shape[1])
    bias = torch.randn(shape[0])
    y = run_kernel(name, x, pw, bias)
    ref = reference_matmul(x, pw, bias)
    assert y.shape == ref.shape == (*lead, shape[0])
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)  # fp32 both sides: summation order only


def int8_rounded(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """x as the int8-activation kernel sees it: K zero-padded to 32, segments of the largest of
    128/96/64/32 that divides the group, per segment q = round(x * 127 / amax), x~ = q * amax / 127."""
    k = pw.in_features
    kp = -(-k // 32) * 32
    group = kp if pw.scheme.group_size == -1 else pw.group
    seg = next(s for s in (128, 96, 64, 32) if group % s == 0)
    xp = torch.nn.functional.pad(x.reshape(-1, k).float(), (0, kp - k))
    out = torch.empty_like(xp)
    for k0 in range(0, kp, seg):
        part = xp[:, k0:k0 + seg]
        amax = part.abs().amax(1, keepdim=True)
        # 127 / amax as one fp32 division (torch's scalar / tensor multiplies by a reciprocal: ties differ)
        inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
        out[:, k0:k0 + seg] = (part * inv).round().clamp(-127, 127) * (amax / torch.full_like(amax, 127.0))
    return out[:, :k].reshape(x.shape)


@pytest.mark.parametrize("scheme", SCHEMES_LOW + SCHEMES_8 + ["W8G64", "W3G256", "W2G32"])
@pytest.mark.parametrize("shape", SHAPES + [(24, 1000)])
@pytest.mark.parametrize("m", [1, 3, 5, 8, 21])
def test_native_i8_is_reference_on_int8_rounded_x(scheme, shape, m):
    """The int8-activation kernel computes exactly dequant(W) . x~ (x~ = int8-rounded x) in fp32."""
    pw = random_packed(*shape, scheme, seed=stable_seed(scheme, shape, m, "i8"))
    # M = 1 (decode has its own zero-point loop), 5 (a quad of rows + a single row), 6, 16, 42 (a pair after the
    # quads); 3-bit codes are expanded ahead of the rows of x from M = 6 on, 2/4-bit from 32 (expand_rows)
    lead = (m,) if m in (1, 5) else (2, m)
    x = torch.randn(*lead, shape[1])
    bias = torch.randn(shape[0])
    y = run_kernel("cpu_avx2_i8", x, pw, bias)
    ref = reference_matmul(int8_rounded(x, pw), pw, bias)
    assert y.shape == ref.shape == (*lead, shape[0])
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    # and close to the unrounded product: up to ~2.2% seen for one row against asymmetric 8-bit weights
    # (their nonzero group means add the rounding errors coherently), over 30 seeds x every case here
    assert rel_err(y, reference_matmul(x, pw, bias)) < 5e-2


def test_native_i8_outlier_stays_in_its_segment():
    """One huge activation coarsens only its own segment's int8 grid, not the whole row."""
    pw = random_packed(16, 256, "W4G128", seed=5)
    x = torch.randn(1, 256)
    x[0, 3] = 1000.0  # segment 0 (channels 0-127)
    y = run_kernel("cpu_avx2_i8", x, pw)
    xr = int8_rounded(x, pw)
    assert (xr[0, :128] - x[0, :128]).abs().max() > (xr[0, 128:] - x[0, 128:]).abs().max() * 20
    assert (xr[0, 128:] - x[0, 128:]).abs().max() < x[0, 128:].abs().max() / 200
    torch.testing.assert_close(y, reference_matmul(xr, pw), rtol=1e-4, atol=1e-3)


def test_quant_linear_plan_follows_buffer_edits_and_forcing():
    """QuantLinear binds kernel + layout per call shape; in-place edits and forcing must still apply."""
    from wq.nn import QuantLinear

    pw = random_packed(32, 256, "W4G128", seed=2)
    other = random_packed(32, 256, "W4G128", seed=3)
    ql = QuantLinear.from_packed(pw)
    x = torch.randn(1, 256)
    with torch.no_grad():
        y0 = ql(x)
        ql.load_state_dict({"qweight": other.qweight, "scales": other.scales, "zeros": other.zeros})
        y1 = ql(x)
        force_kernel("reference")
        try:
            y_ref = ql(x)
        finally:
            force_kernel(None)
    assert not torch.allclose(y0, y1)
    assert rel_err(y1, reference_matmul(x, other)) < 2e-2
    torch.testing.assert_close(y_ref, reference_matmul(x, other))


@pytest.mark.parametrize("scheme", SCHEMES_LOW)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_aten_int4_matches_reference(scheme, shape, m):
    pw = random_packed(*shape, scheme, seed=stable_seed(scheme, shape, m))
    x = torch.randn(m, shape[1])
    y = run_kernel("aten_int4", x, pw)
    assert y.dtype == x.dtype and y.shape == (m, shape[0])
    # bf16 activations, bf16 scales and a bf16 result: compare with the reference on bf16-rounded x
    ref = reference_matmul(x.bfloat16().float(), pw)
    assert rel_err(y, ref) < 8e-3, rel_err(y, ref)
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("scheme", SCHEMES_8)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 5])
def test_aten_int8_matches_reference(scheme, shape, m):
    pw = random_packed(*shape, scheme, seed=7 + m)
    x = torch.randn(m, shape[1])
    ref = reference_matmul(x.bfloat16().float(), pw)
    y = run_kernel("aten_int8", x, pw)
    assert rel_err(y, ref) < 8e-3, rel_err(y, ref)


@pytest.mark.parametrize("name", ["cpu_avx2", "cpu_avx2_dq", "cpu_avx2_i8", "aten_int4"])
def test_act_order_g_idx(name):
    pw = random_packed(48, 256, "W4G64", seed=3, act_order=True)
    assert pw.g_idx is not None
    x = torch.randn(3, 256)
    ref = reference_matmul(x, pw)
    y = run_kernel(name, x, pw)
    if name == "cpu_avx2_i8":  # x is rounded in the kernel's (group-contiguous) channel order
        perm = cpu_native.prepare_native(pw).perm
        xr = torch.empty_like(x)
        xr[:, perm] = int8_rounded(x[:, perm], pw)
        torch.testing.assert_close(y, reference_matmul(xr, pw), rtol=1e-4, atol=1e-4)
    assert rel_err(y, ref) < {"cpu_avx2": 1e-5, "cpu_avx2_dq": 1e-5}.get(name, 2e-2)


@pytest.mark.parametrize(("scheme", "act_order"), [("W4G64", True), ("W3G32", False), ("W2G128", False), ("W8G-1", False)])
def test_prepare_in_row_chunks_equals_one_piece(scheme, act_order, monkeypatch):
    pw = random_packed(200, 256, scheme, seed=4, act_order=act_order)
    whole = cpu_native.prepare_native(pw)
    monkeypatch.setattr(cpu_native, "_PREPARE_CHUNK", 64 * 256)  # 64-row chunks: 64, 64, 72
    chunked = cpu_native.prepare_native(pw)
    for f in ("w", "scales", "zs", "zeros", "perm"):
        a, b = getattr(whole, f), getattr(chunked, f)
        assert (a is None and b is None) or torch.equal(a, b), f
    assert torch.equal(chunked.to_packed(pw).codes(), pw.codes())


def test_bf16_activations_round_trip_dtype():
    pw = random_packed(40, 576, "W4G128", seed=1)
    x = torch.randn(2, 576, dtype=torch.bfloat16)
    for name in ("cpu_avx2", "aten_int4"):
        y = run_kernel(name, x, pw)
        assert y.dtype == torch.bfloat16
        assert rel_err(y, reference_matmul(x.float(), pw)) < 1e-2


@pytest.mark.parametrize("name", ["cpu_avx2", "cpu_avx2_i8"])
@pytest.mark.parametrize("compact", [False, True])
def test_quant_linear_bound_run_equals_kernel(name, compact):
    """QuantLinear's bound closure (bias, bf16, [B, T, K] input, act-order) gives the kernel function's
    own result, bit for bit, on the checkpoint tensors and on a compact layer."""
    from wq.nn import QuantLinear

    pw = random_packed(40, 576, "W3G64-sym", seed=4, act_order=True)
    bias = torch.randn(40)
    ql = QuantLinear.from_packed(pw, bias=bias)
    if compact:
        assert ql.compact_()
    state = KERNELS.get(name).prepare(pw)
    for x in (torch.randn(2, 3, 576), torch.randn(1, 576, dtype=torch.bfloat16)):
        force_kernel(name)
        try:
            with torch.no_grad():
                y = ql(x)
        finally:
            force_kernel(None)
        want = KERNELS.get(name).fn(x.reshape(-1, 576), pw, bias, state).reshape(*x.shape[:-1], 40)
        assert y.shape == (*x.shape[:-1], 40) and y.dtype == x.dtype
        assert torch.equal(y, want)
        # and the math is the layer's: act-order permutation, padding and bias done in C++ agree with the
        # reference (fp32 kernel: summation order; int8 kernel: the int8 rounding of x)
        ref = reference_matmul(x.float(), pw, bias)
        assert rel_err(y.float(), ref) < (1e-2 if x.dtype == torch.bfloat16 or name == "cpu_avx2_i8" else 1e-5)


@pytest.mark.parametrize(("scheme", "m", "expected", "exact"), [
    ("W4G128", 1, "cpu_avx2_i8", "cpu_avx2"), ("W4G128", 512, "cpu_avx2_i8", "cpu_avx2_dq"),
    ("W4G128", 513, "cpu_avx2_dq", "cpu_avx2_dq"), ("W4G128", 16, "cpu_avx2_i8", "cpu_avx2"),
    ("W4G128", 17, "cpu_avx2_i8", "cpu_avx2_dq"), ("W2G128", 512, "cpu_avx2_i8", "cpu_avx2_dq"),
    ("W2G128", 600, "cpu_avx2_dq", "cpu_avx2_dq"), ("W3G128", 1, "cpu_avx2_i8", "cpu_avx2"),
    ("W3G128", 8, "cpu_avx2_i8", "cpu_avx2"), ("W3G128", 9, "cpu_avx2_i8", "cpu_avx2_dq"),
    ("W3G128", 512, "cpu_avx2_i8", "cpu_avx2_dq"), ("W3G128", 513, "cpu_avx2_dq", "cpu_avx2_dq"),
    ("W4G-1", 1024, "cpu_avx2_dq", "cpu_avx2_dq"), ("W8", 1, "cpu_avx2_i8", "cpu_avx2"),
    ("W8", 128, "cpu_avx2_i8", "cpu_avx2_dq"), ("W8", 129, "cpu_avx2_dq", "cpu_avx2_dq"),
    ("W8G128", 300, "cpu_avx2_dq", "cpu_avx2_dq"),
])
def test_dispatch_on_cpu(scheme, m, expected, exact):
    """The measured ranges; inside exact_kernels() (calibration, eval) no kernel that rounds x is picked."""
    pw = random_packed(32, 256, scheme, seed=0)
    x = torch.randn(m, 256)
    assert select(x, pw).name == expected
    with exact_kernels():
        assert select(x, pw).name == exact and KERNELS.get(exact).exact
    assert select(x, pw).name == expected  # the context restores the automatic choice


@pytest.mark.parametrize(("k", "m", "expected"), [
    (2048, 256, "cpu_avx2_i8"), (2048, 257, "cpu_avx2_dq"), (1536, 129, "cpu_avx2_i8"),
    (1504, 129, "cpu_avx2_dq"), (576, 128, "cpu_avx2_i8"), (576, 129, "cpu_avx2_dq"),
])
def test_dispatch_w8_range_depends_on_in_features(k, m, expected):
    """8-bit keeps the int8 kernel to M = 256 only on layers with K >= 1536 (measured); the memo keys on K."""
    for kk in (576, 2048, k):  # a memo keyed without K would hand one layer's choice to the next
        select(torch.randn(m, kk), random_packed(32, kk, "W8", seed=0))
    assert select(torch.randn(m, k), random_packed(32, k, "W8", seed=0)).name == expected


def test_exact_kernels_reach_quant_linear_plans():
    """QuantLinear caches a plan per call shape: entering exact_kernels() must not reuse the int8 plan."""
    pw = random_packed(48, 256, "W4G128", seed=3)
    ql = QuantLinear.from_packed(pw)
    x = torch.randn(4, 256)
    with torch.no_grad():
        fast = ql(x)
        with exact_kernels():
            exact = ql(x)
        again = ql(x)
    ref = reference_matmul(x, pw)
    torch.testing.assert_close(exact, ref, rtol=1e-5, atol=1e-5)  # fp32 kernel: summation order only
    assert not torch.allclose(fast, ref, rtol=1e-5, atol=1e-5)  # the int8 kernel rounds x
    assert torch.equal(again, fast)


def test_tiny_model_logits_fast_vs_reference():
    from transformers import LlamaConfig, LlamaForCausalLM

    import wq

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    wq.quantize_model(model, "W4G32", progress=False)
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        fast = model(ids).logits  # M = 80 rows per layer
        fast_decode = model(ids[:, :1]).logits  # M = 2
        force_kernel("reference")
        try:
            ref = model(ids).logits
            ref_decode = model(ids[:, :1]).logits
        finally:
            force_kernel(None)
    # int8-rounded activations (cpu_avx2_i8): ~0.5% relative error per layer on random weights
    assert rel_err(fast, ref) < 2e-2
    assert rel_err(fast_decode, ref_decode) < 2e-2


@pytest.mark.parametrize("scheme", ["W4G128", "W3G128-asym", "W2G-1", "W8", "W4G64"])
def test_compact_layer_is_exact_and_frees_checkpoint(scheme):
    """compact_ keeps only the CPU layout; outputs, state_dict and the rebuilt checkpoint stay exact."""
    from wq.nn import QuantLinear

    pw = random_packed(48, 320, scheme, seed=11, act_order=scheme == "W4G64")
    ql = QuantLinear.from_packed(pw, bias=torch.randn(48))
    x = torch.randn(5, 320)
    with torch.no_grad():
        y_before = ql(x)
        before = {k: v.clone() for k, v in ql.state_dict().items()}
        assert ql.compact_()
        assert ql.qweight.is_meta and ql.scales.is_meta and ql.zeros.is_meta
        y_after = ql(x)
        after = ql.state_dict()
        force_kernel("reference")
        try:
            y_ref = ql(x)  # another kernel forced: rebuilt checkpoint tensors, exact
        finally:
            force_kernel(None)
    torch.testing.assert_close(y_after, y_before, rtol=0, atol=0)
    torch.testing.assert_close(y_ref, reference_matmul(x, pw, ql.bias), rtol=1e-5, atol=1e-5)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    rebuilt = ql.packed
    assert torch.equal(rebuilt.qweight, pw.qweight) and torch.equal(rebuilt.zeros, pw.zeros)
    assert torch.equal(rebuilt.scales, pw.scales)
    ql.uncompact_()
    assert not ql.qweight.is_meta and torch.equal(ql.qweight, pw.qweight)


def test_compact_model_save_load(tmp_path):
    from conftest import make_tiny_llama

    import wq
    from wq.nn import compact

    model = make_tiny_llama()
    wq.quantize_model(model, "W4G32", progress=False)
    wq.save(model, tmp_path / "a")
    loaded = wq.load(tmp_path / "a", compact=True)
    assert compact(loaded) == (sum(isinstance(m, wq.nn.QuantLinear) for m in loaded.modules()), 0)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, wq.load(tmp_path / "a")(ids).logits, rtol=0, atol=0)
    wq.save(loaded, tmp_path / "b")  # a compact model saves the exact checkpoint tensors
    a, b = wq.io.read_state(tmp_path / "a"), wq.io.read_state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exact_kernels_is_per_thread():
    """Calibration in one thread must not switch the kernels another thread decodes with."""
    import threading

    pw = random_packed(32, 256, "W4G128", seed=0)
    x = torch.randn(1, 256)
    entered, release, seen = threading.Event(), threading.Event(), {}

    def calibrate():
        with exact_kernels():
            seen["inside"] = select(x, pw).name
            entered.set()
            release.wait(10)

    t = threading.Thread(target=calibrate)
    t.start()
    try:
        assert entered.wait(10)
        assert select(x, pw).name == "cpu_avx2_i8"  # this thread: still the automatic choice
    finally:
        release.set()
        t.join()
    assert seen["inside"] == "cpu_avx2"


def test_native_dq_several_tiles():
    """cpu_avx2_dq multiplies tile by tile (8 MiB of fp32 rows each) once W outgrows one tile: 1040 x 2048
    is a 1024-row tile and a 16-row one; bias, bf16 and the leading shape go through the same C++ path."""
    pw = random_packed(1040, 2048, "W4G128", seed=4)
    bias = torch.randn(1040)
    for x in (torch.randn(2, 3, 2048), torch.randn(5, 2048, dtype=torch.bfloat16)):
        y = run_kernel("cpu_avx2_dq", x, pw, bias)
        assert y.shape == (*x.shape[:-1], 1040) and y.dtype == x.dtype
        ref = reference_matmul(x.float(), pw, bias)
        tol = 1e-2 if x.dtype == torch.bfloat16 else 1e-5
        assert rel_err(y.float(), ref) < tol
