"""Differentiable fake quantization of a Linear's weights, for the algorithms that learn rounding.

    w_hat = (clamp(round(wg/s + v) + z, 0, maxq) - z) * s

with straight-through gradients for round() and clamp(), written out by hand (a few fused passes over the
weights instead of autograd's many). Two forms:

- `FakeQuant`: returns w_hat itself (the caller multiplies it in);
- `QuantLinearFn`: returns F.linear(x, w_hat, bias) and keeps for the backward only what the weights cannot
  be rebuilt without: 1-2 byte codes and a clamp mask, plus references to x and the stored weights, which are
  alive anyway. w_hat (4 bytes a weight) is rebuilt in the backward, one Linear at a time, instead of being
  held for every Linear of a block between the forward and the backward. With the weights kept in their
  bf16 storage this is 2 + 1 + 1 bytes a weight for a block's whole autograd state, against 4 + 4 + 1 + 1
  when the fp32 weights and w_hat were saved.

Shapes: w [out, in] (any float dtype; converted to fp32 where used, which is exact for bf16/fp16);
wg, v [out, ng, G] with the partial last group zero-padded; s, z [out, ng, 1] (z integer valued).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import primitives as P


def ste_round(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def ste_fp16(s: Tensor) -> Tensor:
    """Scale rounded to its fp16 storage value, with an identity gradient."""
    return s + (P.round_scale(s) - s).detach()


def _codes(wg: Tensor, v: Tensor, s: Tensor, z: Tensor, maxq: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q - z [out, ng, G] fp32, inside-the-clamp mask, 1/s)."""
    inv_s = 1.0 / s
    qf = torch.round(wg * inv_s + v).add_(z)  # codes before clamping
    inside = (qf >= 0) & (qf <= maxq)  # straight-through region of the clamp
    return qf.clamp_(0, maxq).sub_(z), inside, inv_s


@torch.no_grad()
def codes(w: Tensor, v: Tensor, s: Tensor, z: Tensor, maxq: int) -> Tensor:
    """The integer codes clamp(round(wg/s + v) + z, 0, maxq) [out, ng, G] as the forward computes them,
    stored in uint8 (int16 above 8 bits)."""
    qz, _, _ = _codes(P.group_view(w.float(), v.shape[2]), v, s, z, maxq)
    return qz.add_(z).to(torch.uint8 if maxq <= 255 else torch.int16)


def _small_dtype(maxq: int) -> torch.dtype:
    """q - z lies in [-maxq, maxq]: one byte up to 7 bits, two above."""
    return torch.int8 if maxq <= 127 else torch.int16


def _grads(g: Tensor, wg: Tensor, qz: Tensor, inside: Tensor, inv_s: Tensor, s: Tensor):
    """d/dv, d/ds, d/dz of w_hat given dL/dw_hat = g (all [out, ng, G], s [out, ng, 1])."""
    du = (g * s).mul_(inside)  # d/du of round(u), u = wg/s + v
    # w_hat = qz * s with qz = clamp(round(wg/s + v) + z) - z:
    # ds = sum g*qz + sum du * (-wg/s^2);  dz = sum du - sum g*s (only where clamped: -g*s)
    ds = (g * qz).sum(2, keepdim=True) - (du * wg).sum(2, keepdim=True) * inv_s * inv_s
    dz = du.sum(2, keepdim=True) - (g.sum(2, keepdim=True) * s)
    return du, ds, dz


class FakeQuant(torch.autograd.Function):
    """w_hat [out, ng, G] as a function of (v, s, z); wg is not differentiated."""

    @staticmethod
    def forward(ctx, wg: Tensor, v: Tensor, s: Tensor, z: Tensor, maxq: int) -> Tensor:
        qz, inside, inv_s = _codes(wg, v, s, z, maxq)
        w_hat = qz * s
        # kept for the backward as small integers (1 or 2 bytes instead of 4: the saved state of a block's
        # every Linear is alive at once)
        ctx.save_for_backward(wg, qz.to(_small_dtype(maxq)), inside, inv_s, s)
        return w_hat

    @staticmethod
    def backward(ctx, g: Tensor):
        wg, qz, inside, inv_s, s = ctx.saved_tensors
        du, ds, dz = _grads(g, wg, qz.float(), inside, inv_s, s)
        return None, du, ds, dz, None


def _ungroup(wg: Tensor, in_f: int) -> Tensor:
    """[out, ng, G] -> [out, in] without the padding of a partial last group."""
    w = wg.flatten(1)
    return w if w.shape[1] == in_f else w[:, :in_f]


_CHUNK = 1 << 20  # weights per row chunk of the elementwise passes: their fp32 temporaries stay ~4 MiB each


class QuantLinearFn(torch.autograd.Function):
    """y [..., out] = x [..., in] @ w_hat^T + bias, differentiable in x, v, s and z.

    The elementwise passes go over a few rows at a time, so a Linear's temporaries are w_hat itself (built for
    the matmul and dropped) plus chunk-sized scratch, not several fp32 copies of the weights.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, v: Tensor, s: Tensor, z: Tensor, maxq: int,
                bias: Tensor | None) -> Tensor:
        out_f, in_f = w.shape
        G = v.shape[2]
        w_hat = torch.empty(out_f, v.shape[1] * G, dtype=torch.float32, device=w.device)  # [out, ng*G]
        qz_small = torch.empty(v.shape, dtype=_small_dtype(maxq), device=w.device)
        inside = torch.empty(v.shape, dtype=torch.bool, device=w.device)
        for r0, r1 in P.row_chunks(out_f, in_f, _CHUNK):
            qz, ins, _ = _codes(P.group_view(w[r0:r1].float(), G), v[r0:r1], s[r0:r1], z[r0:r1], maxq)
            qz_small[r0:r1] = qz
            inside[r0:r1] = ins
            w_hat[r0:r1] = qz.mul_(s[r0:r1]).flatten(1)
        ctx.save_for_backward(x, w, qz_small, inside, s)
        return F.linear(x, w_hat[:, :in_f], bias)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w, qz_small, inside, s = ctx.saved_tensors
        out_f, in_f = w.shape
        G = qz_small.shape[2]
        g2 = gy.reshape(-1, out_f)  # [tokens, out]
        x2 = x.reshape(-1, in_f)  # [tokens, in]
        gx = None
        if ctx.needs_input_grad[0]:
            w_hat = _ungroup(qz_small.float().mul_(s), in_f)
            gx = g2.mm(w_hat).view(*gy.shape[:-1], in_f)
            del w_hat
        du = torch.empty(qz_small.shape, dtype=torch.float32, device=w.device)
        ds = torch.empty_like(s)
        dz = torch.empty_like(s)
        for r0, r1 in P.row_chunks(out_f, in_f, _CHUNK):
            gw = P.group_view(g2[:, r0:r1].t().mm(x2), G)  # dL/dw_hat of these rows, zero-padded [rows, ng, G]
            sc = s[r0:r1]
            du[r0:r1], ds[r0:r1], dz[r0:r1] = _grads(gw, P.group_view(w[r0:r1].float(), G),
                                                    qz_small[r0:r1].float(), inside[r0:r1], 1.0 / sc, sc)
        return gx, None, du, ds, dz, None, None


@contextlib.contextmanager
def quantized_forwards(forwards: dict[nn.Module, Callable[[Tensor], Tensor]]) -> Iterator[None]:
    """While inside, each nn.Linear key of `forwards` computes its value(x) instead of its own forward (an
    instance `forward`, so its hooks still run; one already there, e.g. wq.calib.upcast's, comes back after).
    Its stored weight is untouched."""
    patched = []
    try:
        for lin, fn in forwards.items():
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"fake quantization needs an nn.Linear, got {type(lin).__name__}")
            patched.append((lin, vars(lin).get("forward")))
            lin.forward = fn
        yield
    finally:
        for lin, prev in reversed(patched):
            if prev is None:
                del lin.forward
            else:
                lin.forward = prev
