"""SignRound's rounding offsets V held as integers: V = k * unit, k an int16 count of the smallest step.

The signed update with a linearly decaying step,
    V -= lr * (1 - t/T) * sign(g) = unit * (T - t) * sign(g),   unit = lr / T,
moves V by whole multiples of `unit`, and V's bound 0.5 is a multiple of it too at the default lr = 1/T
(0.5 / unit = T^2 / 2, or T^2 with unit halved when T is odd). So k = V / unit is an integer at every step
and V is held exactly in 2 bytes a weight (up to ~250 iterations at the default lr; 4 bytes above, the int16
range being |k| <= 32767), against 4 for an fp32 V that also rounds every addition. Where 0.5 / unit is not an
integer (an unusual lr), V's bound becomes the largest multiple of unit below 0.5.

The offsets are not an autograd leaf (integers have no gradient): wq.algorithms.fake_quant writes dL/dV into
`grad` (summed over the calls and backwards until it is taken) and returns a zero gradient for `token`, a 0-dim
leaf that puts the offsets in the graph. With several ranks the caller takes `grad` after the backward. With one
process the caller sets `step_at` for the minibatch's last backward, and the backward of the Linear's last
pending call (`pending`, counted by fake_quant.quant_linear) takes the signed step itself, a few rows at a time as
their dL/dV is computed, so no gradient of the whole Linear is held; what was summed in earlier micro-batches
is stepped with it, or after the backward when the last one never reached the Linear (an MoE expert).

Shapes: k, grad [out, ng, G]; values(r0, r1) [r1 - r0, ng, G] fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

_INT16_MAX = 32767


def _units_per_half(unit: float) -> tuple[int, int]:
    """(m, kmax): the step count is multiplied by m (1 or 2) so that 0.5 = kmax * unit / m exactly if it can be."""
    for m in (1, 2):
        half = 0.5 * m / unit
        if abs(half - round(half)) < 1e-6 * max(half, 1.0):
            return m, round(half)
    return 1, int(0.5 / unit)


class IntOffsets:
    """V [out, ng, G] = k * unit with k integer in [-kmax, kmax]; steps of `lr * (iters - it) / iters`."""

    def __init__(self, shape: torch.Size | tuple[int, ...], lr: float, iters: int, device: torch.device | str = "cpu"):
        iters = max(iters, 1)
        self.m, self.kmax = _units_per_half(lr / iters)
        self.unit = lr / iters / self.m  # python float; values() multiplies in fp32
        # the largest step is iters * m units; k +- a step must not wrap before the clamp
        dtype = torch.int16 if self.kmax + iters * self.m <= _INT16_MAX else torch.int32
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.shape = torch.Size(shape)
        self.iters = iters
        self.token = torch.zeros((), requires_grad=True)  # carries "dL/dV is complete" through autograd
        self.grad: Tensor | None = None  # [out, ng, G] fp32, written by the backward
        self.pending = 0  # forward calls whose backward is still to come (wq.algorithms.fake_quant.quant_linear)
        self.step_at: int | None = None  # set: the backward steps V at this iteration once dL/dV is complete

    def values(self, r0: int = 0, r1: int | None = None) -> Tensor:
        """V of rows r0:r1 in fp32 [rows, ng, G]."""
        return self.k[r0:r1].float().mul_(self.unit)

    def add_grad(self, r0: int, r1: int, g: Tensor) -> None:
        """Accumulate dL/dV of rows r0:r1 (a Linear called twice in one forward gets the sum, as autograd would)."""
        if self.grad is None:
            self.grad = torch.zeros(self.k.shape, dtype=torch.float32, device=self.k.device)
        self.grad[r0:r1] += g

    def take_grad(self) -> Tensor:
        """dL/dV, handed over and forgotten (zeros if no call reached this Linear, e.g. an unrouted expert)."""
        g, self.grad = self.grad, None
        return torch.zeros(self.k.shape, dtype=torch.float32, device=self.k.device) if g is None else g

    @torch.no_grad()
    def signed_step_(self, g: Tensor, it: int, r0: int = 0, r1: int | None = None) -> None:
        """V[r0:r1] -= lr * (1 - it/iters) * sign(g), clamped to [-0.5, 0.5]; exact in integers. g [r1 - r0, ng, G]
        is overwritten."""
        n = (self.iters - it) * self.m
        if n:
            k = self.k[r0:r1]
            k.sub_(g.sign_().mul_(n).to(k.dtype)).clamp_(-self.kmax, self.kmax)

    def release(self) -> None:
        """Drop V (nothing steps or reads it again); the shape stays known."""
        self.k = self.k.new_empty(0)
        self.grad = None

    def zero_(self) -> None:
        self.k.zero_()
        self.grad = None
        self.pending = 0
