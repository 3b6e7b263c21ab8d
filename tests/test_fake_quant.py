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
from wq.algorithms.fake_quant import FakeQuant, QuantLinearFn, quant_linear, quantized_forwards
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


@pytest.mark.parametrize("scheme,in_f", [("W4G128", 320), ("W4G-1", 320), ("W2G32", 200)])
def test_fused_linear_in_blocks_equals_one_pass(scheme, in_f, monkeypatch):
    """With chunks small enough that the output, dL/dx and dL/dV go in several blocks of rows and of columns
    (groups, or one group's columns at W4G-1), the fused Linear gives FakeQuant's output and gradients."""
    import wq.algorithms.fake_quant as fq

    monkeypatch.setattr(fq, "_CHUNK", 64 * 64)
    sch = QuantScheme.parse(scheme)
    w, off, s, z = _state(200, in_f, sch, seed=2)
    assert len(P.row_chunks(200, in_f, fq._CHUNK)) > 1
    assert len(fq._col_blocks(200, off.shape[1], off.shape[2], in_f, fq._CHUNK)) > 1
    x = torch.randn(3, 7, in_f, requires_grad=True)
    gy = torch.randn(3, 7, 200)
    y1 = QuantLinearFn.apply(x, w, off.token, s, z, sch.maxq, None, off)
    g1 = list(torch.autograd.grad(y1, (x, off.token, s, z), gy))
    g1[1] = off.take_grad()
    v = off.values().requires_grad_(True)
    w_hat = FakeQuant.apply(P.group_view(w, v.shape[2]), v, s, z, sch.maxq).flatten(1)[:, :in_f]
    y2 = F.linear(x, w_hat)
    g2 = torch.autograd.grad(y2, (x, v, s, z), gy)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    for a, b, name in zip(g1, g2, "xvsz"):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_fused_linear_output_may_be_modified_in_place():
    """Models add into a Linear's output in place (falcon, llama4): the fused Linear's output is not a view."""
    sch = QuantScheme.parse("W4G128")
    w, off, s, z = _state(64, 128, sch)
    y = quant_linear(torch.randn(2, 3, 128, requires_grad=True), w, s, z, sch.maxq, None, off)
    y += 1.0
    y.sum().backward()
    assert off.take_grad().abs().sum() > 0


def test_fused_linear_saves_nothing_a_weight():
    """Between forward and backward a quantized Linear holds only x, the stored weights, s and z (all alive
    anyway): no codes, no mask, no copy of w_hat or of fp32 weights; the backward rebuilds them from w and V."""
    sch = QuantScheme.parse("W4G128")
    w, off, s, z = _state(256, 512, sch)
    w16 = w.to(torch.bfloat16)
    x = torch.randn(1, 8, 512)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        quant_linear(x, w16, s, z, sch.maxq, None, off)
    kept = {t.data_ptr() for t in (x, w16, s, z)}
    assert [t for t in saved if t.data_ptr() not in kept] == []
    assert off.k.element_size() == 2  # and V itself: int16


@pytest.mark.parametrize("calls", [1, 2])
def test_backward_steps_v_in_place_once_every_call_is_done(calls):
    """With off.step_at set, the backward of a Linear's last pending call takes V's signed step itself (rows at a
    time when a single call's dL/dV is all there is: no gradient of the whole Linear is held), and the step
    equals the one taken from the summed dL/dV of every call."""
    sch = QuantScheme.parse("W4G128")
    w, ref, s, z = _state(192, 256, sch)
    w, off, _, _ = _state(192, 256, sch)
    x = [torch.randn(1, 6, 256, requires_grad=True) for _ in range(calls)]
    gy = [torch.randn(1, 6, 192) for _ in range(calls)]
    loss = sum((QuantLinearFn.apply(xi, w, ref.token, s, z, sch.maxq, None, ref) * g).sum() for xi, g in zip(x, gy))
    loss.backward()
    ref.signed_step_(ref.take_grad(), 3)

    off.step_at = 3
    held = []
    add = off.add_grad
    off.add_grad = lambda r0, r1, g: (held.append((r0, r1)), add(r0, r1, g))
    loss = sum((quant_linear(xi, w, s, z, sch.maxq, None, off) * g).sum() for xi, g in zip(x, gy))
    assert off.pending == calls
    loss.backward()
    assert off.pending == 0 and off.grad is None
    assert torch.equal(off.k, ref.k) and not torch.equal(off.k, _state(192, 256, sch)[1].k)
    assert (held == []) == (calls == 1)  # one call: stepped row by row, never summed into a gradient


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


@pytest.mark.parametrize("out_f,G,in_f", [(200, 32, 200), (200, 32, 320), (14336, 1024, 4096), (64, 576, 576),
                                           (48, 128, 160), (5632, 128, 2048)])
def test_column_blocks_cover_every_column_once_and_wide(out_f, G, in_f):
    """dL/dx's column blocks: every column once, in order, none narrower than 64 columns (where the weight has
    64), none much over the chunk (a group larger than the chunk is split inside)."""
    import wq.algorithms.fake_quant as fq

    for elements in (64 * 64, 1 << 20):
        ng = -(-in_f // G)
        cols = []
        for g0, g1, j0, j1 in fq._col_blocks(out_f, ng, G, in_f, elements):
            c0, c1 = g0 * G + j0, min((g1 - 1) * G + j1, in_f)
            assert c1 - c0 >= min(64, in_f), (g0, g1, j0, j1)
            assert out_f * (c1 - c0) <= max(2 * elements, out_f * 128), (g0, g1, j0, j1)
            cols.append((c0, c1))
        assert cols[0][0] == 0 and cols[-1][1] == in_f
        assert all(a[1] == b[0] for a, b in zip(cols, cols[1:]))


def test_a_step_needs_counted_calls():
    """A backward that would step V but was not counted (QuantLinearFn.apply called directly) is refused: V
    could step while another call of the Linear still needs it."""
    sch = QuantScheme.parse("W4G128")
    w, off, s, z = _state(64, 128, sch)
    off.step_at = 0
    y = QuantLinearFn.apply(torch.randn(2, 128, requires_grad=True), w, off.token, s, z, sch.maxq, None, off)
    with pytest.raises(RuntimeError, match="quant_linear"):
        y.sum().backward()


def test_blocks_are_larger_on_a_gpu():
    """The blocked passes use ~1M-weight blocks on CPU and 64x that elsewhere: on a GPU an 8B model's MLP
    Linear (14336 x 4096) is one block, a 405B one (53248 x 16384) about a dozen."""
    import wq.algorithms.fake_quant as fq

    cpu, gpu = fq.block_weights(torch.device("cpu")), fq.block_weights(torch.device("cuda"))
    assert gpu == 64 * cpu
    assert len(P.row_chunks(14336, 4096, gpu)) == 1 and len(P.row_chunks(14336, 4096, cpu)) > 50
    assert 8 <= len(P.row_chunks(53248, 16384, gpu)) <= 16
