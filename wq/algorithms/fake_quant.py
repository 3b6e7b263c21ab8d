"""Differentiable fake quantization of a Linear's weights, for the algorithms that learn rounding.

    w_hat = (clamp(round(wg/s + v) + z, 0, maxq) - z) * s

with straight-through gradients for round() and clamp(), written out by hand (a few fused passes over the
weights instead of autograd's many). Two forms:

- `FakeQuant`: returns w_hat itself (the caller multiplies it in);
- `QuantLinearFn`: returns F.linear(x, w_hat, bias) with V held as integers (wq.algorithms.offsets) and keeps
  for the backward only references to x and the stored weights, which are alive anyway, and the small s, z: the codes and w_hat
  are rebuilt in the backward from the weights and V, one Linear at a time, instead of being held for every
  Linear of a block between the forward and the backward. With the weights kept in their bf16 storage a
  block's autograd state holds no bytes a weight beyond them and V, against 4 + 4 + 1 + 1 when the fp32
  weights, w_hat, the codes and the clamp mask were saved.

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
from .offsets import IntOffsets

_CHUNK = 1 << 20  # weights per row chunk of the elementwise passes: their fp32 temporaries stay ~4 MiB each
# On a GPU a few large matmuls beat many small ones and the temporaries come from the caching allocator, so the
# blocks there are 64x larger (256 MiB of fp32: a whole Linear up to 8B-model sizes). Not measured on a GPU.
_GPU_CHUNK = 1 << 26


def block_weights(device: torch.device) -> int:
    """Weights per block of the blocked passes and matmuls on `device`."""
    return _CHUNK if device.type == "cpu" else _GPU_CHUNK


def ste_round(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def ste_fp16(s: Tensor) -> Tensor:
    """Scale rounded to its fp16 storage value, with an identity gradient."""
    return s + (P.round_scale(s) - s).detach()


def _unclamped(wg: Tensor, v: Tensor, inv_s: Tensor, z: Tensor, inplace: bool = False) -> Tensor:
    """round(wg/s + v) + z [out, ng, G] fp32: the codes before the clamp (one definition, so the forward, the
    backward and the exported codes round alike). inplace: written over wg (one fp32 temporary fewer)."""
    q = wg.mul_(inv_s) if inplace else wg * inv_s
    return q.add_(v).round_().add_(z)


def _codes(wg: Tensor, v: Tensor, s: Tensor, z: Tensor, maxq: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q - z [out, ng, G] fp32, inside-the-clamp mask, 1/s)."""
    inv_s = 1.0 / s
    qf = _unclamped(wg, v, inv_s, z)
    inside = (qf >= 0) & (qf <= maxq)  # straight-through region of the clamp
    return qf.clamp_(0, maxq).sub_(z), inside, inv_s


@torch.no_grad()
def codes(w: Tensor, off: IntOffsets, s: Tensor, z: Tensor, maxq: int) -> Tensor:
    """The integer codes clamp(round(wg/s + v) + z, 0, maxq) [out, ng, G] as the forward computes them,
    stored in uint8 (int16 above 8 bits); a few rows at a time."""
    out_f, in_f = w.shape
    q = torch.empty(off.shape, dtype=torch.uint8 if maxq <= 255 else torch.int16, device=w.device)
    for r0, r1 in P.row_chunks(out_f, in_f, block_weights(w.device)):
        q[r0:r1] = _codes_rows(w, off, s, z, maxq, r0, r1)
    return q


def _codes_rows(w: Tensor, off: IntOffsets, s: Tensor, z: Tensor, maxq: int, r0: int, r1: int) -> Tensor:
    """clamp(round(wg/s + v) + z, 0, maxq) of rows r0:r1 [rows, ng, G] fp32."""
    wg = P.group_view(w[r0:r1].to(torch.float32, copy=True), off.shape[2])  # a copy of its own: overwritten
    return _unclamped(wg, off.values(r0, r1), 1.0 / s[r0:r1], z[r0:r1], inplace=True).clamp_(0, maxq)


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


def _col_blocks(out_f: int, ng: int, G: int, in_f: int, elements: int) -> list[tuple[int, int, int, int]]:
    """(g0, g1, j0, j1): blocks of columns of every row, about `elements` weights each and at least 64 columns
    wide where the weight has them (a narrow remainder joins the block before it, as in P.row_chunks, whose
    note on narrow matmuls applies): whole groups g0:g1 when one group of every row fits in `elements`, else
    the columns j0:j1 of one group at a time (a group of a whole row, W4G-1, or very large groups; whole groups
    again where a group cannot give two blocks of 64 or the last, partial group is narrower than 64)."""
    if ng > 1 and (out_f * G <= elements or G < 128 or in_f - (ng - 1) * G < 64):
        per = max(-(-64 // G), elements // max(out_f * G, 1))
        blocks = [(g0, min(g0 + per, ng)) for g0 in range(0, ng, per)]
        if len(blocks) > 1 and in_f - blocks[-1][0] * G < 64:  # the last block's columns (its last group may be partial)
            last = blocks.pop()
            blocks[-1] = (blocks[-1][0], last[1])
        return [(g0, g1, 0, G) for g0, g1 in blocks]
    # one group's columns split as P.row_chunks splits rows (each column spans all out_f rows)
    return [(g, g + 1, j0, j1) for g in range(ng) for j0, j1 in P.row_chunks(min(G, in_f - g * G), out_f, elements)]


def _w_hat_rows(w: Tensor, off: IntOffsets, s: Tensor, z: Tensor, maxq: int, r0: int, r1: int) -> Tensor:
    """w_hat of rows r0:r1 [rows, in] fp32."""
    return _ungroup(_codes_rows(w, off, s, z, maxq, r0, r1).sub_(z[r0:r1]).mul_(s[r0:r1]), w.shape[1])


def _w_hat_cols(w: Tensor, off: IntOffsets, s: Tensor, z: Tensor, maxq: int, block: tuple[int, int, int, int]):
    """w_hat of every row in one column block of _col_blocks [out, columns] fp32, and the columns' range."""
    g0, g1, j0, j1 = block
    G = off.shape[2]
    in_f = w.shape[1]
    c0, c1 = g0 * G + j0, min((g1 - 1) * G + j1, in_f)
    wg = P.group_view(w[:, c0:c1].to(torch.float32, copy=True), j1 - j0)  # [out, g1 - g0, j1 - j0], overwritten
    v = off.k[:, g0:g1, j0:j1].float().mul_(off.unit)
    sc, zc = s[:, g0:g1], z[:, g0:g1]
    qf = _unclamped(wg, v, 1.0 / sc, zc, inplace=True)
    return qf.clamp_(0, maxq).sub_(zc).mul_(sc).flatten(1)[:, : c1 - c0], (c0, c1)


def linear_by_rows(x: Tensor, w_hat_rows: Callable[[int, int], Tensor], bias: Tensor | None, out_f: int,
                   in_f: int) -> Tensor:
    """F.linear(x, w_hat, bias) [..., out] fp32 with w_hat made by w_hat_rows(r0, r1) [rows, in] a block of rows
    at a time (block_weights), so no fp32 copy of the whole Linear exists. The output is allocated in its final
    shape, not returned as a view: some models add into a Linear's output in place."""
    x2 = x.reshape(-1, in_f)  # [tokens, in]
    y = torch.empty(*x.shape[:-1], out_f, dtype=torch.float32, device=x.device)  # [..., out]
    y2 = y.view(-1, out_f)  # [tokens, out]
    for r0, r1 in P.row_chunks(out_f, in_f, block_weights(x.device)):
        y2[:, r0:r1] = F.linear(x2, w_hat_rows(r0, r1), None if bias is None else bias[r0:r1])
    return y


class QuantLinearFn(torch.autograd.Function):
    """y [..., out] = x [..., in] @ w_hat^T + bias, differentiable in x, s and z, and in V through `off`: dL/dV
    goes to off.add_grad (or straight into a signed step of V, see below) and off.token gets a zero gradient
    (see wq.algorithms.offsets).

    Kept for the backward: x and the stored weights (alive anyway) and the small s, z; nothing a weight. The
    backward rebuilds the codes from w, V, s and z by the forward's own arithmetic (V does not move in between:
    it steps only once every call's backward is done), so a block's autograd state holds no per-weight bytes
    beyond the weights and V themselves. Every pass over the weights goes a few rows (or columns) at a time,
    the matmuls included: y by blocks of its output columns, dL/dx by blocks of its columns, dL/dw_hat by
    blocks of rows, so no fp32 copy of a whole Linear's weights is ever made (each block's matmul sums the
    same products in the same order as the whole one: identical results on this CPU's BLAS at >= 64 columns).
    When off.step_at is set and this is the Linear's last pending call with nothing summed before it, V steps
    a few rows at a time from their dL/dV, so no gradient of the whole Linear is held either.
    Called through quant_linear(), which counts the pending calls.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, token: Tensor, s: Tensor, z: Tensor, maxq: int,
                bias: Tensor | None, off: IntOffsets) -> Tensor:
        y = linear_by_rows(x, lambda r0, r1: _w_hat_rows(w, off, s, z, maxq, r0, r1), bias, *w.shape)
        ctx.save_for_backward(x, w, s, z)
        ctx.maxq, ctx.off = maxq, off
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w, s, z = ctx.saved_tensors
        maxq, off = ctx.maxq, ctx.off
        last, direct = backward_begins(off)
        out_f, in_f = w.shape
        G = off.shape[2]
        g2 = gy.reshape(-1, out_f)  # [tokens, out]
        x2 = x.reshape(-1, in_f)  # [tokens, in]
        gx = None
        if ctx.needs_input_grad[0]:  # before any row of V steps
            gx = torch.empty(g2.shape[0], in_f, dtype=torch.float32, device=gy.device)  # [tokens, in]
            for block in _col_blocks(out_f, off.shape[1], G, in_f, block_weights(w.device)):
                w_hat, (c0, c1) = _w_hat_cols(w, off, s, z, maxq, block)
                gx[:, c0:c1] = g2.mm(w_hat)
            gx = gx.view(*gy.shape[:-1], in_f)
        ds = torch.empty_like(s)
        dz = torch.empty_like(s)
        for r0, r1 in P.row_chunks(out_f, in_f, block_weights(w.device)):
            rows = RowCodes.of(w, off, s, z, maxq, r0, r1)  # the forward's codes, V not yet stepped
            rows.grads_into(g2[:, r0:r1].t().mm(x2), off, direct, ds, dz)
        backward_ends(off, last, direct)
        gtoken = torch.zeros((), device=gy.device) if ctx.needs_input_grad[2] else None
        return gx, None, gtoken, ds, dz, None, None, None


def backward_begins(off: IntOffsets) -> tuple[bool, bool]:
    """A backward of one call of a Linear through its offsets begins: (last, direct). last: this is the Linear's
    last pending call and V steps after it; direct: nothing was summed before, so V's rows may step as their
    dL/dV is computed (RowCodes.grads_into)."""
    if off.step_at is not None and off.pending <= 0:  # V would step while another call may still need it
        raise RuntimeError("fake quantization: a backward that steps V but no pending call; call the Linear "
                           "through quant_linear() (or count the call in off.pending), which counts the calls")
    off.pending = max(off.pending - 1, 0)
    last = off.pending == 0 and off.step_at is not None
    return last, last and off.grad is None


def backward_ends(off: IntOffsets, last: bool, direct: bool) -> None:
    """After every row's RowCodes.grads_into: a step of what was summed over calls or micro-batches."""
    if last and not direct:
        off.signed_step_(off.take_grad(), off.step_at)


class RowCodes:
    """The codes of rows r0:r1 of a Linear as the forward computed them, for its backward (and the w_hat the
    forward multiplied): wg [rows, ng, G] fp32, qz = clamped codes - z, inside the clamp, 1/s."""

    __slots__ = ("r0", "r1", "wg", "qz", "inside", "inv_s", "s")

    @classmethod
    def of(cls, w: Tensor, off: IntOffsets, s: Tensor, z: Tensor, maxq: int, r0: int, r1: int) -> RowCodes:
        self = cls()
        self.r0, self.r1, self.s = r0, r1, s[r0:r1]
        zc = z[r0:r1]
        self.inv_s = 1.0 / self.s
        self.wg = P.group_view(w[r0:r1].float(), off.shape[2])
        qf = _unclamped(self.wg, off.values(r0, r1), self.inv_s, zc)
        self.inside = (qf >= 0).logical_and_(qf <= maxq)
        self.qz = qf.clamp_(0, maxq).sub_(zc)
        return self

    def w_hat(self, in_f: int) -> Tensor:
        """[rows, in] fp32: the same values as _w_hat_rows."""
        return _ungroup(self.qz * self.s, in_f)

    def grads_into(self, gw: Tensor, off: IntOffsets, direct: bool, ds: Tensor, dz: Tensor) -> None:
        """From dL/dw_hat of these rows gw [rows, in]: d/ds, d/dz into ds, dz [out, ng, 1], and dL/dV stepped
        (direct) or summed into the offsets."""
        gw = P.group_view(gw, off.shape[2])  # zero-padded [rows, ng, G]
        du, ds[self.r0:self.r1], dz[self.r0:self.r1] = _grads(gw, self.wg, self.qz, self.inside, self.inv_s, self.s)
        if direct:
            off.signed_step_(du, off.step_at, self.r0, self.r1)
        else:
            off.add_grad(self.r0, self.r1, du)


def quant_linear(x: Tensor, w: Tensor, s: Tensor, z: Tensor, maxq: int, bias: Tensor | None,
                 off: IntOffsets) -> Tensor:
    """QuantLinearFn on x, counting the call in off.pending when a backward will follow."""
    if torch.is_grad_enabled() and (off.token.requires_grad or x.requires_grad or s.requires_grad):
        off.pending += 1
    return QuantLinearFn.apply(x, w, off.token, s, z, maxq, bias, off)


@contextlib.contextmanager
def quantized_forwards(forwards: dict[nn.Module, Callable[[Tensor], Tensor]]) -> Iterator[None]:
    """While inside, each nn.Linear key of `forwards` computes its value(x) instead of its own forward (an
    instance `forward`, so its hooks still run; one already there, e.g. wq.calib.upcast's, comes back after).
    Its stored weight is untouched."""
    for lin in forwards:
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"fake quantization needs an nn.Linear, got {type(lin).__name__}")
    with patched_forwards(forwards):
        yield


@contextlib.contextmanager
def patched_forwards(forwards: dict[nn.Module, Callable]) -> Iterator[None]:
    """While inside, each module key of `forwards` runs its value instead of its own forward (as an instance
    `forward`: its hooks still run; an instance forward already there comes back after)."""
    patched = []
    try:
        for mod, fn in forwards.items():
            patched.append((mod, vars(mod).get("forward")))
            mod.forward = fn
        yield
    finally:
        for mod, prev in reversed(patched):
            if prev is None:
                del mod.forward
            else:
                mod.forward = prev
