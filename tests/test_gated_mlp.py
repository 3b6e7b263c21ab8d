"""The fused gated MLP of autoround (wq.algorithms.gated_mlp) against the Linears' own fused forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_blocks import linears, tiny_block
from torch import nn

import wq.algorithms.autoround as ar
import wq.algorithms.fake_quant as fq
import wq.algorithms.gated_mlp as gm
from wq import primitives as P
from wq.algorithms.offsets import IntOffsets
from wq.scheme import QuantScheme


def _side(out_f: int, in_f: int, sch: QuantScheme, seed: int):
    """(w, s, z, maxq, bias, offsets) of one Linear, V random, some weights clamped."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    wg = P.group_view(w, sch.group_for(in_f))
    s = (wg.abs().amax(2, keepdim=True) / sch.maxq * 1.7).requires_grad_(True)
    z = torch.full_like(s, float(sch.maxq // 2)).requires_grad_(True)
    off = IntOffsets(wg.shape, 1 / 16, 16)
    off.k.copy_(torch.randint(-off.kmax, off.kmax + 1, wg.shape, generator=g))
    return [w, s, z, sch.maxq, torch.randn(out_f, generator=g), off]


def _run(fused: bool, recompute: bool, sch: QuantScheme, step: bool, inter: int = 320, hid: int = 96):
    """h, dL/dx, (ds, dz) of both sides, V of both sides after the step (or their summed dL/dV)."""
    gate, up = _side(inter, hid, sch, 1), _side(inter, hid, sch, 2)
    x = torch.randn(2, 9, hid, generator=torch.Generator().manual_seed(3), requires_grad=True)
    gh = torch.randn(2, 9, inter, generator=torch.Generator().manual_seed(4))
    for side in (gate, up):
        side[5].step_at = 5 if step else None
    if fused:
        h = gm.gated_up(x, F.silu, tuple(gate), tuple(up), recompute=recompute)
    else:
        lin = [fq.quant_linear(x, w, s, z, q, b, o) for w, s, z, q, b, o in (gate, up)]
        h = F.silu(lin[0]) * lin[1]
    grads = torch.autograd.grad(h, (x, gate[1], gate[2], up[1], up[2]), gh)
    v = [gate[5].k.clone(), up[5].k.clone()] if step else [gate[5].take_grad(), up[5].take_grad()]
    return h.detach(), grads, v


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("scheme", ["W4G32", "W4G-1", "W2G32"])
@pytest.mark.parametrize("step", [True, False])
def test_gated_up_equals_the_linears_own(scheme, recompute, step, monkeypatch):
    """Over several slices of the intermediate width (small blocks), the fused first half gives the same output,
    the same V steps (or summed dL/dV) and scale/zero gradients bit for bit as two fused Linears through autograd,
    and dL/dx within float rounding (it is summed by slices)."""
    monkeypatch.setattr(fq, "_CHUNK", 64 * 96)
    sch = QuantScheme.parse(scheme)
    assert len(P.row_chunks(320, 96, fq.block_weights(torch.device("cpu")))) > 1
    h1, g1, v1 = _run(True, recompute, sch, step)
    h2, g2, v2 = _run(False, False, sch, step)
    assert torch.equal(h1, h2)
    for a, b in zip(v1, v2):
        assert torch.equal(a, b)
    assert not torch.equal(v1[0], _side(320, 96, sch, 1)[5].k) if step else float(v1[0].abs().sum()) > 0
    for a, b, name in zip(g1[1:], g2[1:], ("ds_gate", "dz_gate", "ds_up", "dz_up")):
        assert torch.equal(a, b), name
    torch.testing.assert_close(g1[0], g2[0], rtol=1e-4, atol=1e-4)


def test_gated_up_recompute_keeps_only_the_input():
    """With recompute the forward keeps x (and the stored weights, s, z), nothing of the intermediate width;
    without, gate's and up's outputs."""
    sch = QuantScheme.parse("W4G32")
    gate, up = _side(320, 96, sch, 1), _side(320, 96, sch, 2)
    x = torch.randn(1, 8, 96, requires_grad=True)
    for recompute, wide in ((True, 0), (False, 2)):
        saved = []

        def pack(t, saved=saved):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            gm.gated_up(x, F.silu, tuple(gate), tuple(up), recompute=recompute)
        assert sum(1 for t in saved if t.shape[-1] == 320 and t.dim() == 2) == wide


class _SwappedMLP(nn.Module):
    """Named like a gated MLP but computing down(gate(x) * act(up(x))): must not be fused."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


@pytest.mark.parametrize("recompute", [False, True])
def test_autoround_fuses_gated_mlps_and_only_those(recompute, monkeypatch):
    """autoround_block fuses a Llama block's MLP (the same codes and loss as without, where the width is one slice)
    and leaves an MLP that only looks gated to its own forward."""
    calls = []
    monkeypatch.setattr(ar, "gated_up", lambda *a, **k: (calls.append(1), gm.gated_up(*a, **k))[1])
    block, inputs, kwargs, targets = tiny_block()
    plan = {n: QuantScheme.parse("W3G32") for n in linears(block)}
    kw = dict(iters=6, lr=0.05, batch_size=2, recompute_mlp=recompute)
    fused = ar.autoround_block(block, plan, inputs, kwargs, targets, **kw)
    assert calls
    with monkeypatch.context() as m:
        m.setattr(ar, "_gated_mlps", lambda *a: {})
        plain = ar.autoround_block(block, plan, inputs, kwargs, targets, **kw)
    for n in plan:
        assert torch.equal(fused[n].packed.qweight, plain[n].packed.qweight), n
    assert fused[n].stats["loss"] == plain[n].stats["loss"] < plain[n].stats["rtn_loss"]

    found = []
    real = ar._gated_mlps
    monkeypatch.setattr(ar, "_gated_mlps", lambda *a: (found.append(real(*a)), found[-1])[1])
    ar.autoround_block(block, plan, inputs, kwargs, targets, **kw)
    assert list(found[0]) == [block.mlp]
    block.mlp = _SwappedMLP(block.mlp)
    with torch.no_grad():
        targets = [ar._block_out(block(x, **k)) for x, k in zip(inputs, kwargs)]
    ar.autoround_block(block, plan, inputs, kwargs, targets, **kw)
    assert found[1] == {}
