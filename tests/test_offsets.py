"""wq.algorithms.offsets: SignRound's V held as int16 step counts is exactly the real-number V of the signed
updates (no rounding of additions), with its bound exactly 0.5 at the default lr."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from wq.algorithms.offsets import IntOffsets


@pytest.mark.parametrize("iters,lr", [(200, None), (37, None), (8, None), (300, None), (16, 0.07)])
def test_signed_steps_equal_exact_arithmetic(iters, lr):
    """Random signs (zeros included) for every iteration: k * unit equals V computed in exact fractions,
    clamped to [-0.5, 0.5] after every step (or the largest multiple of the step below it)."""
    lr = 1 / iters if lr is None else lr
    off = IntOffsets((4, 3, 5), lr, iters)
    g = torch.Generator().manual_seed(iters)
    signs = torch.randint(-1, 2, (iters, 4, 3, 5), generator=g)
    # biased towards one side so that some offsets reach the bound and stay there
    signs[:, 0] = 1
    signs[:, 1] = -1
    exact_lr = Fraction(1, iters) if lr == 1 / iters else Fraction(lr)
    bound = Fraction(1, 2) if lr == 1 / iters else Fraction(off.kmax) * exact_lr / iters / off.m
    ref = [Fraction(0)] * signs[0].numel()
    for it in range(iters):
        grad = signs[it].float()
        off.signed_step_(grad.clone(), it)
        step = exact_lr * (iters - it) / iters
        ref = [min(bound, max(-bound, v - step * int(s))) for v, s in zip(ref, signs[it].flatten().tolist())]
    got = [Fraction(int(k)) * exact_lr / iters / off.m for k in off.k.flatten().tolist()]
    assert got == ref
    assert min(ref) == -bound and max(ref) == bound  # the clamp was exercised
    # the fp32 values handed to the forward are the exact ones, rounded once
    torch.testing.assert_close(off.values(), torch.tensor([float(v) for v in ref]).view(4, 3, 5), rtol=0, atol=1e-7)


def test_two_bytes_up_to_about_250_iterations_then_four():
    assert IntOffsets((2, 2, 2), 1 / 200, 200).k.dtype == torch.int16
    assert IntOffsets((2, 2, 2), 1 / 37, 37).k.dtype == torch.int16  # odd: half steps, bound 37^2 = 1369
    assert IntOffsets((2, 2, 2), 1 / 256, 256).k.dtype == torch.int32  # 0.5 = 32768 steps: over int16
    assert IntOffsets((2, 2, 2), 1 / 37, 37).kmax == 37 * 37


def test_gradient_accumulates_over_calls_and_is_handed_over_once():
    off = IntOffsets((2, 1, 4), 1 / 4, 4)
    assert torch.equal(off.take_grad(), torch.zeros(2, 1, 4))  # never reached: no step
    off.add_grad(0, 1, torch.ones(1, 1, 4))
    off.add_grad(0, 2, torch.full((2, 1, 4), 2.0))
    g = off.take_grad()
    assert torch.equal(g, torch.tensor([3.0, 2.0]).view(2, 1, 1).expand(2, 1, 4))
    assert off.grad is None
