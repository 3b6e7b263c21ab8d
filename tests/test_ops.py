"""torch.ops.wq.dequant_matmul: schema/fake/autograd checks, QuantLinear through it, torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wq.kernels import KERNELS, Kernel, force_kernel, ops
from wq.kernels.reference import reference_matmul
from wq.nn.quant_linear import QuantLinear
from wq.packing import PackedWeight
from wq.primitives import minmax_qparams, quantize
from wq.scheme import QuantScheme


def make_packed(scheme: str, n: int, k: int, seed: int = 0) -> PackedWeight:
    s = QuantScheme.parse(scheme)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    scale, zero = minmax_qparams(w, s)
    return PackedWeight.from_codes(quantize(w, scale, zero, s), scale, zero, s)


def quant_linear(scheme: str, n: int, k: int, bias: bool = True, seed: int = 0) -> QuantLinear:
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    return QuantLinear.from_packed(make_packed(scheme, n, k, seed), b)


def tiny_model() -> nn.Module:
    return nn.Sequential(quant_linear("W4G32", 48, 40), nn.SiLU(), quant_linear("W3G32", 24, 48, bias=False, seed=2),
                         nn.SiLU(), quant_linear("W2G-1", 16, 24, seed=3))


def test_opcheck_schema_fake_and_autograd():
    """torch's own consistency checks: schema, fake vs real, autograd registration, compile-ability."""
    pw = make_packed("W4G32", 24, 40)
    x = torch.randn(3, 40, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    torch.library.opcheck(torch.ops.wq.dequant_matmul.default,
                          (x, pw.qweight, pw.scales, pw.zeros, None, bias, 4, 32, True, 40))


@pytest.mark.parametrize("scheme", ["W4G128", "W3G128", "W2G64", "W8G-1"])
def test_quant_linear_goes_through_op_and_matches_reference(scheme):
    layer = quant_linear(scheme, 30, 576)  # 576: partial last group of 128/256
    x = torch.randn(2, 5, 576)
    torch.testing.assert_close(layer(x), reference_matmul(x, layer.packed, layer.bias))


def test_backward_matches_dequantized_linear():
    layer = quant_linear("W4G32", 24, 40)
    x = torch.randn(4, 40, requires_grad=True)
    layer(x).square().sum().backward()
    w = layer.packed.dequantize().requires_grad_(False)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = layer.bias.detach().float().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, w, b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_torch_compile_fullgraph_matches_eager():
    """fullgraph: dynamo must see one opaque op per layer (no graph breaks in the dispatcher's Python)."""
    torch._dynamo.reset()
    model = tiny_model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for shape in ((1, 40), (3, 7, 40)):
        x = torch.randn(*shape)
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow
def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    model = tiny_model()
    x = torch.randn(2, 40)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


_PREPARED: list[int] = []
if "test_counting" not in KERNELS:
    KERNELS.add("test_counting", Kernel(
        name="test_counting", fn=lambda x, pw, bias, state: reference_matmul(x, pw, bias) + 0 * state,
        devices=frozenset({"cpu"}), priority=-1000,  # never chosen unless forced
        prepare=lambda pw: (_PREPARED.append(1), torch.zeros(()))[1]))


def test_repacked_layout_cached_per_weight_and_invalidated_by_in_place_load():
    layer = quant_linear("W4G32", 24, 40)
    other = quant_linear("W4G32", 24, 40, seed=5)
    x = torch.randn(2, 40)
    force_kernel("test_counting")
    try:
        _PREPARED.clear()
        layer(x)
        layer(x)
        assert len(_PREPARED) == 1  # prepared once, then cached
        layer.load_state_dict(other.state_dict())  # copies into the same buffers, in place
        y = layer(x)
        assert len(_PREPARED) == 2  # stale layout dropped
        torch.testing.assert_close(y, reference_matmul(x, other.packed, other.bias))
    finally:
        force_kernel(None)
        ops.clear_cache()
