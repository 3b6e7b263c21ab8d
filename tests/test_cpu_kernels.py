"""CPU kernels (aten int4/int8, wq's AVX2 extension) against the reference, and the CPU dispatch."""

from __future__ import annotations

import pytest
import torch

from wq.kernels import KERNELS, cpu_native, force_kernel, select
from wq.kernels.reference import reference_matmul
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


def run_kernel(name: str, x: torch.Tensor, pw: PackedWeight, bias=None) -> torch.Tensor:
    if name == "cpu_avx2" and pw.scheme.bits == 3:
        name = "cpu_avx2_3bit"  # same kernel and layout, its own M limit
    k = KERNELS.get(name)
    reason = k.why_not("cpu", x.dtype, pw, x.numel() // x.shape[-1])
    assert reason is None or reason.startswith("M="), reason  # tests may go past the dispatch M limits
    return k.fn(x, pw, bias, k.prepare(pw))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def test_native_extension_builds():
    """The AVX2 extension must build on every x86 machine with a compiler (CI included)."""
    assert cpu_native.available(), "cpu_avx2 extension did not build: see the warning logged above"


@pytest.mark.parametrize("scheme", SCHEMES_LOW + SCHEMES_8 + ["W8G64", "W3G256"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_native_matches_reference(scheme, shape, m):
    pw = random_packed(*shape, scheme, seed=hash((scheme, shape, m)) % 1000)
    x = torch.randn(2, m, shape[1])  # leading batch dims are kept
    bias = torch.randn(shape[0])
    y = run_kernel("cpu_avx2", x, pw, bias)
    ref = reference_matmul(x, pw, bias)
    assert y.shape == ref.shape == (2, m, shape[0])
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)  # fp32 both sides: summation order only


@pytest.mark.parametrize("scheme", SCHEMES_LOW)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_aten_int4_matches_reference(scheme, shape, m):
    pw = random_packed(*shape, scheme, seed=hash((scheme, shape, m)) % 1000)
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


@pytest.mark.parametrize("name", ["cpu_avx2", "aten_int4"])
def test_act_order_g_idx(name):
    pw = random_packed(48, 256, "W4G64", seed=3, act_order=True)
    assert pw.g_idx is not None
    x = torch.randn(3, 256)
    ref = reference_matmul(x, pw)
    y = run_kernel(name, x, pw)
    assert rel_err(y, ref) < (1e-5 if name == "cpu_avx2" else 8e-3)


def test_bf16_activations_round_trip_dtype():
    pw = random_packed(40, 576, "W4G128", seed=1)
    x = torch.randn(2, 576, dtype=torch.bfloat16)
    for name in ("cpu_avx2", "aten_int4"):
        y = run_kernel(name, x, pw)
        assert y.dtype == torch.bfloat16
        assert rel_err(y, reference_matmul(x.float(), pw)) < 1e-2


@pytest.mark.parametrize(("scheme", "m", "expected"), [
    ("W4G128", 1, "cpu_avx2"), ("W2G128", 64, "cpu_avx2"), ("W3G128", 1, "cpu_avx2_3bit"), ("W8", 1, "cpu_avx2"),
    ("W4G128", 256, "aten_int4"), ("W3G128", 16, "aten_int4"), ("W8", 256, "aten_int8"),
    ("W8G128", 256, "reference"),
])
def test_dispatch_on_cpu(scheme, m, expected):
    pw = random_packed(32, 256, scheme, seed=0)
    assert select(torch.randn(m, 256), pw).name == expected


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
        fast = model(ids).logits  # M = 80 rows per layer: aten_int4 on CPU
        fast_decode = model(ids[:, :1]).logits  # M = 2: cpu_avx2
        force_kernel("reference")
        try:
            ref = model(ids).logits
            ref_decode = model(ids[:, :1]).logits
        finally:
            force_kernel(None)
    assert rel_err(fast, ref) < 2e-2
    torch.testing.assert_close(fast_decode, ref_decode, rtol=1e-3, atol=1e-3)
