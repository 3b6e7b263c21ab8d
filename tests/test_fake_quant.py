"""wq.algorithms.fake_quant: the fused fake-quantized Linear gives autograd's own gradients while saving only
small integers, and autoround on a block that keeps its bf16 weights equals autoround on their fp32 copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_blocks import out, tiny_block
from torch import nn

from wq import primitives as P
from wq.algorithms.autoround import autoround_block
from wq.algorithms.fake_quant import FakeQuant, QuantLinearFn, quantized_forwards
from wq.algorithms.offsets import IntOffsets
from wq.calib.upcast import fp32_linears
from wq.scheme import QuantScheme


def _state(out_f: int, in_f: int, scheme: QuantScheme, seed: int = 0):
    """Weights, integer offsets (16 iterations at lr 1/16: V in steps of 1/256), scales and zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    G = scheme.group_for(in_f)
    wg = P.group_view(w, G)
    s = (wg.abs().amax(2, keepdim=True) / scheme.maxq * 1.7).requires_grad_(True)  # some weights clamp
    z = torch.full_like(s, float(scheme.maxq // 2)).requires_grad_(True)
    off = IntOffsets(wg.shape, 1 / 16, 16)
    off.k.copy_(torch.randint(-off.kmax, off.kmax + 1, wg.shape, generator=g))
    return w, off, s, z


@pytest.mark.parametrize("scheme,in_f", [("W4G128", 256), ("W3G128", 160), ("W2G32", 96), ("W8G128", 128)])
def test_fused_linear_matches_autograd(scheme, in_f):
    """QuantLinearFn's output and its gradients for x, v (written into the integer offsets), s and z equal
    FakeQuant on the same V values followed by F.linear."""
    sch = QuantScheme.parse(scheme)
    w, off, s, z = _state(48, in_f, sch)
    bias = torch.randn(48)
    x = torch.randn(2, 5, in_f, requires_grad=True)
    gy = torch.randn(2, 5, 48)

    y1 = QuantLinearFn.apply(x, w, off.token, s, z, sch.maxq, bias, off)
    g1 = list(torch.autograd.grad(y1, (x, off.token, s, z), gy))
    assert float(g1[1]) == 0.0  # the token's own gradient: dL/dV is in the offsets
    g1[1] = off.take_grad()
    v = off.values().requires_grad_(True)
    w_hat = FakeQuant.apply(P.group_view(w, v.shape[2]), v, s, z, sch.maxq).flatten(1)[:, :in_f]
    y2 = F.linear(x, w_hat, bias)
    g2 = torch.autograd.grad(y2, (x, v, s, z), gy)
    assert torch.equal(y1, y2)
    for a, b, name in zip(g1, g2, "xvsz"):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert float(g1[1].abs().sum()) > 0 and float((g1[1] == 0).sum()) > 0  # clamped weights get no V gradient


def test_fused_linear_saves_small_integers():
    """Between forward and backward a quantized Linear holds x and the stored weights (both alive anyway) plus
    1 byte a weight (the saturated codes): no 4-byte copy of w_hat or of fp32 weights, no separate mask."""
    sch = QuantScheme.parse("W4G128")
    w, off, s, z = _state(256, 512, sch)
    w16 = w.to(torch.bfloat16)
    x = torch.randn(1, 8, 512)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        QuantLinearFn.apply(x, w16, off.token, s, z, sch.maxq, None, off)
    new = [t for t in saved if t.data_ptr() not in (x.data_ptr(), w16.data_ptr())]
    per_weight = sum(t.numel() * t.element_size() for t in new) / w.numel()
    assert per_weight < 1.1, per_weight
    assert off.k.element_size() == 2  # and V itself: int16


@pytest.mark.parametrize("scheme", ["W4G128", "W2G128", "W3G128-sym"])
def test_autoround_on_bf16_weights_equals_fp32_copy(scheme):
    """A block whose Linears keep bf16 weights (computing in fp32 through wq.calib.upcast, as the streamed pipeline
    runs autoround) gives the same codes, scales and loss as the same weights held in fp32."""
    block, inputs, kwargs, _ = tiny_block("qwen2", seed=3)  # q/k/v with biases
    lin = [m for m in block.modules() if isinstance(m, nn.Linear)]
    for m in lin:
        m.weight.data = m.weight.data.to(torch.bfloat16).float()  # values a bf16 checkpoint can hold
    with torch.no_grad():
        targets = [out(block(x, **kw)) for x, kw in zip(inputs, kwargs)]
    plan = {n: QuantScheme.parse(scheme) for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    ref = autoround_block(block, plan, inputs, kwargs, targets, iters=12, batch_size=2)
    for m in lin:
        m.weight.data = m.weight.data.to(torch.bfloat16)
    with fp32_linears(lin):
        got = autoround_block(block, plan, inputs, kwargs, targets, iters=12, batch_size=2)
    assert all(m.weight.dtype == torch.bfloat16 for m in lin)  # read, never converted in place
    for n in plan:
        assert torch.equal(got[n].packed.qweight, ref[n].packed.qweight), n
        assert torch.equal(got[n].packed.scales, ref[n].packed.scales), n
        assert got[n].stats == {**ref[n].stats, "seconds": got[n].stats["seconds"]}


def test_quantized_forwards_restores_an_earlier_instance_forward():
    lin = nn.Linear(4, 3)
    with fp32_linears([lin.to(torch.bfloat16)]):
        before = vars(lin)["forward"]
        with quantized_forwards({lin: lambda x: x.sum(-1, keepdim=True).expand(*x.shape[:-1], 3)}):
            assert torch.equal(lin(torch.ones(1, 4)), torch.full((1, 3), 4.0))
        assert vars(lin)["forward"] is before
    assert "forward" not in vars(lin)
    with pytest.raises(TypeError, match="nn.Linear"):
        with quantized_forwards({nn.Conv1d(1, 1, 1): lambda x: x}):
            pass
