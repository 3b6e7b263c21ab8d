"""A gated MLP's first half, act(gate(x)) * up(x), fake-quantized and differentiated a slice of the
intermediate width at a time, for the algorithms that learn rounding (autoround).

Through autograd, a gated MLP (Llama, Qwen, Mistral, Gemma: down(act(gate(x)) * up(x))) holds through its
backward the gate's and up's outputs, the activation, the product and, at the peak of the product's backward,
three gradients of the same width: ~7 tensors [tokens, intermediate] in fp32, the largest thing a block's
training holds after its weights (~150 MiB at 1024 tokens of a hidden-2048 Llama; ~12 GiB at 16k tokens of a
70B). Here the backward takes dL/dh from down_proj and, for each slice of intermediate rows, rebuilds gate's and
up's rows of w_hat once and finishes the slice: dL/dx (summed over slices), dL/dw_hat of those rows (their V
stepped or summed, their scale and zero gradients); nothing of the full width but dL/dh and what the forward kept:
gate's and up's outputs (3 tensors of the width through the backward), or with `recompute` only x, the outputs
recomputed on each slice (2 tensors, for 2 more matmuls). One rebuild of the codes per Linear fewer than the
Linears' own backward, whose dL/dx and dL/dw_hat passes rebuild them apart.

The same values as the Linears' own fused forward and backward (wq.algorithms.fake_quant.QuantLinearFn), bit for
bit, except dL/dx where the intermediate width spans several slices (a hidden-2048 Llama's 5632: 11 slices):
it sums the same products grouped by slices (float rounding, ~1e-7 relative), which signed descent can carry
into other codes, as a micro-batch does.

Shapes: x [..., H]; h [..., I]; gate and up weights [I, H].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import primitives as P
from .fake_quant import RowCodes, _w_hat_rows, backward_begins, backward_ends, block_weights
from .offsets import IntOffsets


class GatedUpFn(torch.autograd.Function):
    """h = act(x @ gate_hat^T + bg) * (x @ up_hat^T + bu), differentiable in x and in each side's (V, s, z).
    recompute: keep only x and recompute gate's and up's outputs in the backward (2 more matmuls), else keep them
    (2 tensors of the intermediate width more through the backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, act: Callable[[Tensor], Tensor], wg: Tensor, tg: Tensor, sg: Tensor, zg: Tensor,
                bg: Tensor | None, og: IntOffsets, wu: Tensor, tu: Tensor, su: Tensor, zu: Tensor,
                bu: Tensor | None, ou: IntOffsets, maxq_g: int, maxq_u: int, recompute: bool) -> Tensor:
        inter, hid = wg.shape
        x2 = x.reshape(-1, hid)  # [tokens, H]
        h = torch.empty(*x.shape[:-1], inter, dtype=torch.float32, device=x.device)  # [..., I]
        h2 = h.view(-1, inter)
        keep = not recompute  # (no backward to follow: the caller says recompute, nothing is kept)
        g_all = torch.empty_like(h2) if keep else None  # [tokens, I]
        u_all = torch.empty_like(h2) if keep else None
        # the row blocks of wq.algorithms.fake_quant.linear_by_rows: each output column comes from the same matmul
        for r0, r1 in P.row_chunks(inter, hid, block_weights(x.device)):
            g = F.linear(x2, _w_hat_rows(wg, og, sg, zg, maxq_g, r0, r1), None if bg is None else bg[r0:r1])
            u = F.linear(x2, _w_hat_rows(wu, ou, su, zu, maxq_u, r0, r1), None if bu is None else bu[r0:r1])
            h2[:, r0:r1] = act(g) * u
            if keep:
                g_all[:, r0:r1], u_all[:, r0:r1] = g, u
        ctx.save_for_backward(x, wg, sg, zg, wu, su, zu, g_all, u_all)
        ctx.act, ctx.bg, ctx.bu, ctx.og, ctx.ou, ctx.maxq = act, bg, bu, og, ou, (maxq_g, maxq_u)
        return h

    @staticmethod
    def backward(ctx, gh: Tensor):
        x, wg, sg, zg, wu, su, zu, g_all, u_all = ctx.saved_tensors
        og, ou, act = ctx.og, ctx.ou, ctx.act
        inter, hid = wg.shape
        ends = [backward_begins(og), backward_begins(ou)]
        x2 = x.reshape(-1, hid)  # [tokens, H]
        gh2 = gh.reshape(-1, inter)  # [tokens, I]
        gx = torch.zeros_like(x2) if ctx.needs_input_grad[0] else None  # [tokens, H]
        ds_g, dz_g, ds_u, dz_u = (torch.empty_like(t) for t in (sg, sg, su, su))
        # the forward's slices: where the width is one slice (SmolLM2-135M's 1536 at hidden 576), dL/dx too is summed as
        # the Linears' own backward sums it, and everything is bit for bit the same
        for r0, r1 in P.row_chunks(inter, hid, block_weights(x.device)):
            rg = RowCodes.of(wg, og, sg, zg, ctx.maxq[0], r0, r1)  # before these rows of V step
            ru = RowCodes.of(wu, ou, su, zu, ctx.maxq[1], r0, r1)
            w_g, w_u = rg.w_hat(hid), ru.w_hat(hid)  # [rows, H]
            if g_all is None:  # the forward's own matmuls again (>= 64 rows: the same sums as its row blocks)
                g = F.linear(x2, w_g, None if ctx.bg is None else ctx.bg[r0:r1])
                u = F.linear(x2, w_u, None if ctx.bu is None else ctx.bu[r0:r1])
            else:
                g, u = g_all[:, r0:r1].detach(), u_all[:, r0:r1]
            with torch.enable_grad():
                g.requires_grad_(True)
                a = act(g)
            gh_c = gh2[:, r0:r1]
            gu = gh_c * a.detach()  # dL/du [tokens, rows]
            (gg,) = torch.autograd.grad(a, g, gh_c * u)  # dL/dg
            del a, g, u
            if gx is not None:
                gx.addmm_(gg, w_g).addmm_(gu, w_u)
            del w_g, w_u
            rg.grads_into(gg.t().mm(x2), og, ends[0][1], ds_g, dz_g)
            del rg, gg
            ru.grads_into(gu.t().mm(x2), ou, ends[1][1], ds_u, dz_u)
        backward_ends(og, *ends[0])
        backward_ends(ou, *ends[1])
        need = ctx.needs_input_grad
        tg = torch.zeros((), device=gh.device) if need[3] else None
        tu = torch.zeros((), device=gh.device) if need[9] else None
        gx = None if gx is None else gx.view(*gh.shape[:-1], hid)
        return gx, None, None, tg, ds_g, dz_g, None, None, None, tu, ds_u, dz_u, None, None, None, None, None


def gated_up(x: Tensor, act: Callable[[Tensor], Tensor], gate: tuple, up: tuple, recompute: bool = False) -> Tensor:
    """GatedUpFn on x; gate and up are (w, s, z, maxq, bias, offsets) of each Linear. Counts the call in each
    side's offsets when a backward will follow (as wq.algorithms.fake_quant.quant_linear does)."""
    wg, sg, zg, mg, bg, og = gate
    wu, su, zu, mu, bu, ou = up
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (og.token, ou.token, x, sg, su))
    if backward:
        og.pending += 1
        ou.pending += 1
    recompute = recompute or not backward  # nothing to keep for
    return GatedUpFn.apply(x, act, wg, og.token, sg, zg, bg, og, wu, ou.token, su, zu, bu, ou, mg, mu, recompute)
