"""AutoRound-style signed-gradient rounding (the SignRound idea), one decoder block at a time.

For every Linear of a block we learn
    V      [out, n_groups, G]  a rounding offset per weight in [-0.5, 0.5]   (init 0 = round to nearest)
    alpha  [out, n_groups, 1]  multiplier of the group's max (asym) / absmax (sym) in [min_range, 1]
    beta   [out, n_groups, 1]  multiplier of the group's min (asym only)          in [min_range, 1]
so that the fake-quantized weights
    s = (alpha*max - beta*min) / maxq, z = round(-beta*min / s)  (sym: s = alpha*absmax*factor, see primitives)
    w_hat = (clamp(round(W/s + V) + z, 0, maxq) - z) * s
make the block's output match the unquantized block's output (`targets`) in mean squared error.
round() passes gradients straight through; the update is signed gradient descent,
p -= lr_t * sign(dL/dp) with lr_t decaying linearly from `lr` (default 1/iters) to 0, on random
minibatches of the calibration samples. The iterate with the lowest minibatch loss relative to
round-to-nearest's loss on the same minibatch is kept (raw losses of different samples are not
comparable); it is then checked on all samples and RTN is kept if it is not better there.
Scales are rounded to fp16 inside the loop (straight-through) so the learned codes are exactly those
wq.primitives produces for the stored scales.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .. import primitives as P
from ..calib.distributed import all_gather_floats, all_reduce_scalar, all_reduce_sum_, offsets, rank_world
from ..packing import PackedWeight
from ..scheme import QuantScheme
from .base import ALGORITHMS, Algorithm, QuantResult

log = logging.getLogger(__name__)

# kwargs a decoder block gets during a full-model forward that make no sense when replaying it
_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "cache_position", "output_attentions")


def _ste_round(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def _ste_fp16(s: Tensor) -> Tensor:
    """Scale rounded to its fp16 storage value, with an identity gradient."""
    return s + (P.round_scale(s) - s).detach()


class _FakeQuant(torch.autograd.Function):
    """w_hat = (clamp(round(wg/s + v) + z, 0, maxq) - z) * s with straight-through round and clamp
    gradients, written out by hand: a few fused passes over the weights instead of autograd's many.

    wg, v: [out, ng, G]; s, z: [out, ng, 1] (z integer valued). Gradients for v, s and z.
    """

    @staticmethod
    def forward(ctx, wg: Tensor, v: Tensor, s: Tensor, z: Tensor, maxq: int) -> Tensor:
        inv_s = 1.0 / s
        qf = torch.round(wg * inv_s + v).add_(z)  # codes before clamping
        inside = (qf >= 0) & (qf <= maxq)  # straight-through region of the clamp
        qz = qf.clamp_(0, maxq).sub_(z)  # q - z: integers in [-maxq, maxq]
        w_hat = qz * s
        # kept for the backward as small integers (1 or 2 bytes instead of 4: the saved state of a block's
        # every Linear is alive at once)
        ctx.save_for_backward(wg, qz.to(torch.int8 if maxq <= 127 else torch.int16), inside, inv_s, s)
        return w_hat

    @staticmethod
    def backward(ctx, g: Tensor):
        wg, qz, inside, inv_s, s = ctx.saved_tensors
        qz = qz.float()
        du = (g * s).mul_(inside)  # d/du of round(u), u = wg/s + v
        # w_hat = qz * s with qz = clamp(round(wg/s + v) + z) - z:
        # ds = sum g*qz + sum du * (-wg/s^2);  dz = sum du - sum g*s (only where clamped: -g*s)
        ds = (g * qz).sum(2, keepdim=True) - (du * wg).sum(2, keepdim=True) * inv_s * inv_s
        dz = du.sum(2, keepdim=True) - (g.sum(2, keepdim=True) * s)
        return None, du, ds, dz, None


class _Snapshots:
    """Keep and bring back the best iterate of a layer's learnable tensors (those `params()` returns)."""

    @torch.no_grad()
    def snapshot(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params()]

    @torch.no_grad()
    def save_into(self, saved: list[Tensor]) -> None:
        """snapshot() into the tensors of an earlier snapshot (no new memory)."""
        for p, s in zip(self.params(), saved):
            s.copy_(p)

    @torch.no_grad()
    def restore(self, saved: list[Tensor]) -> None:
        for p, s in zip(self.params(), saved):
            p.copy_(s)


@dataclass
class _Target(_Snapshots):
    """One Linear's learnable rounding state; weights in the grouped, zero-padded view."""

    name: str  # relative to the block, e.g. "self_attn.q_proj"
    scheme: QuantScheme
    w: Tensor  # [out, in] fp32, the original weights
    wg: Tensor  # [out, ng, G] fp32 (partial last group zero-padded)
    wmax: Tensor  # [out, ng, 1] max(w, 0)  (sym: absmax)
    wmin: Tensor  # [out, ng, 1] min(w, 0)  (sym: unused)
    v: Tensor  # [out, ng, G] rounding offsets, requires grad
    alpha: Tensor | None  # [out, ng, 1] range multipliers, require grad (None: no range learning)
    beta: Tensor | None
    sym_factor: Tensor | None = None  # [out, ng, 1] sym scale = alpha * absmax * factor (P.sym_scale_factor)

    @classmethod
    def make(cls, name: str, weight: Tensor, scheme: QuantScheme, learn_range: bool) -> _Target:
        w = weight.detach().float()
        wg = P.group_view(w, scheme.group_for(w.shape[1]))
        wmin = wg.amin(dim=2, keepdim=True).clamp(max=0)
        wmax = wg.amax(dim=2, keepdim=True).clamp(min=0)
        factor = None
        if scheme.sym:
            factor = P.sym_scale_factor(wmin, wmax, scheme)
            wmax = torch.maximum(wmin.abs(), wmax)
        ones = torch.ones_like(wmax)
        alpha = ones.clone().requires_grad_(True) if learn_range else None
        beta = ones.clone().requires_grad_(True) if learn_range and not scheme.sym else None
        return cls(name, scheme, w, wg, wmax, wmin, torch.zeros_like(wg, requires_grad=True), alpha, beta, factor)

    def params(self) -> list[Tensor]:
        return [p for p in (self.v, self.alpha, self.beta) if p is not None]

    def qparams(self) -> tuple[Tensor, Tensor]:
        """(scale, zero) [out, ng, 1], differentiable through straight-through rounding."""
        maxq = self.scheme.maxq
        hi = self.wmax if self.alpha is None else self.wmax * self.alpha
        if self.scheme.sym:
            s = _ste_fp16(hi * self.sym_factor)
            return s, torch.full_like(s, float(2 ** (self.scheme.bits - 1)))
        lo = self.wmin if self.beta is None else self.wmin * self.beta
        s = _ste_fp16((hi - lo) / maxq)
        z = torch.clamp(_ste_round(-lo / s), 0, maxq)
        return s, z

    def fake_quant(self) -> Tensor:
        """w_hat [out, in] as a differentiable function of (V, alpha, beta)."""
        s, z = self.qparams()
        w_hat = _FakeQuant.apply(self.wg, self.v, s, z, self.scheme.maxq)  # [out, ng, G]
        in_f = self.w.shape[1]
        w_hat = w_hat.flatten(1)
        return w_hat if w_hat.shape[1] == in_f else w_hat[:, :in_f]

    @torch.no_grad()
    def reset_to_rtn(self) -> None:
        """Back to the starting point, round-to-nearest: no offsets, full ranges (no snapshot needed)."""
        self.v.zero_()
        for p in (self.alpha, self.beta):
            if p is not None:
                p.fill_(1.0)

    @torch.no_grad()
    def clamp_(self, min_range: float) -> None:
        self.v.clamp_(-0.5, 0.5)
        for p in (self.alpha, self.beta):
            if p is not None:
                p.clamp_(min_range, 1.0)

    @torch.no_grad()
    def finalize(self) -> tuple[Tensor, Tensor, Tensor]:
        """Integer codes [out, in] int32, scale and zero [out, ng] under wq.primitives conventions."""
        s, z = self.qparams()  # already fp16-exact scales, integer zeros
        s, z = s.squeeze(2), z.squeeze(2)
        assert torch.equal(s, P.round_scale(s))
        in_f = self.w.shape[1]
        q = torch.clamp(torch.round(self.wg / s[..., None] + self.v) + z[..., None], 0, self.scheme.maxq)
        return q.flatten(1)[:, :in_f].to(torch.int32), s, z


def _samples(inputs: list[Tensor], kwargs: list[dict], targets: list[Tensor]):
    """Split calibration batches into single samples: [(x [1,T,H], kwargs, y [1,T,H])].

    Tensors in kwargs whose first dimension equals the batch size (>1) are split with it; the rest
    (rotary tables with batch 1, None masks) are shared.
    """
    out = []
    for x, kw, y in zip(inputs, kwargs, targets):
        kw = {k: v for k, v in kw.items() if k not in _DROP_KWARGS}
        b = x.shape[0]
        for i in range(b):
            out.append((x[i : i + 1], _slice_kwargs(kw, b, i), y[i : i + 1]))
    return out


def _slice_kwargs(kw, b: int, i: int):
    if isinstance(kw, Tensor):
        return kw[i : i + 1] if b > 1 and kw.dim() > 0 and kw.shape[0] == b else kw
    if isinstance(kw, dict):
        return {k: _slice_kwargs(v, b, i) for k, v in kw.items()}
    if isinstance(kw, (tuple, list)):
        return type(kw)(_slice_kwargs(v, b, i) for v in kw)
    return kw


def _collate(items: list):
    """Concatenate per-sample kwargs (tensors with batch dim 1 that differ across samples)."""
    first = items[0]
    if isinstance(first, Tensor):
        if first.dim() == 0 or first.shape[0] != 1 or all(t is first for t in items):
            return first
        if all(torch.equal(t, first) for t in items[1:]):
            return first  # shared (e.g. identical rotary tables): broadcasting over the batch is enough
        return torch.cat(items, 0)
    if isinstance(first, dict):
        return {k: _collate([d[k] for d in items]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_collate([t[j] for t in items]) for j in range(len(first)))
    return first


@torch.no_grad()
def _per_sample_loss(block: nn.Module, states: list[_Target], samples: list, bs: int, dev) -> list[float]:
    """MSE of every calibration sample with the current fake-quantized weights."""
    weights = {f"{t.name}.weight": t.fake_quant() for t in states}
    losses: list[float] = []
    for j in range(0, len(samples), bs):
        chunk = samples[j : j + bs]
        x = torch.cat([c[0] for c in chunk], 0).to(dev, torch.float32)
        y = torch.cat([c[2] for c in chunk], 0).to(dev, torch.float32)
        kw = _to_device(_collate([c[1] for c in chunk]), dev)
        out = _block_out(functional_call(block, weights, (x,), kw))
        losses += (out - y).pow(2).flatten(1).mean(1).tolist()  # [chunk]
    return losses


def _to_device(obj, dev: torch.device):
    if isinstance(obj, Tensor):
        return obj.to(dev)
    if isinstance(obj, dict):
        return {k: _to_device(v, dev) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(v, dev) for v in obj)
    return obj


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def autoround_block(
    block: nn.Module,
    plan: dict[str, QuantScheme],
    inputs: list[Tensor],
    kwargs: list[dict],
    targets: list[Tensor],
    *,
    iters: int = 200,
    lr: float | None = None,
    batch_size: int = 8,
    learn_range: bool = True,
    min_range: float = 0.5,
    seed: int = 0,
) -> dict[str, QuantResult]:
    """Signed-gradient rounding of every Linear named in `plan` (names relative to `block`).

    inputs/targets: per calibration batch, [b, T, H] hidden states into / out of the unquantized
    block; kwargs: the other arguments of each call (rotary tables, masks). The block's own weights
    are left untouched; returns {name: QuantResult} with stats loss (= best_loss, the kept iterate's
    MSE over all samples), rtn_loss (RTN's), best_iter (0: RTN kept).
    """
    if iters < 0:
        raise ValueError(f"autoround: iters={iters} must be >= 0")
    lr = 1.0 / max(iters, 1) if lr is None else lr
    states = [_Target.make(n, block.get_submodule(n).weight, s, learn_range) for n, s in plan.items()]
    for t in states:
        if not t.scheme.is_int:
            raise ValueError(f"autoround: {t.name} has float scheme {t.scheme}; use an integer scheme")
    params = [p for t in states for p in t.params()]
    samples = _samples(inputs, kwargs, targets)
    # under torchrun each rank holds a contiguous share of the samples: minibatches are drawn from the global
    # indices (the same draw on every rank), each rank computes its members' part of the loss (normalised by
    # the global minibatch), and the gradients are summed over the ranks: one process's run, split
    first, total = offsets(len(samples))
    if not total:
        raise ValueError("autoround needs calibration samples (inputs is empty)")
    bs = max(1, min(batch_size, total))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def members(idx: list[int]) -> list[int]:
        return [i - first for i in idx if first <= i < first + len(samples)]

    dev = next(block.parameters()).device  # inputs may live on CPU (low-memory pipelines)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:  # no gradients for the block's own weights: only d/dw_hat is needed
        p.requires_grad_(False)
    was_training = block.training
    block.eval()
    t0 = time.perf_counter()
    try:
        # Minibatch losses of different samples are not comparable (some text is harder): score each
        # iterate by its loss relative to round-to-nearest's loss on the same samples instead.
        rtn_per_sample = all_gather_floats(_per_sample_loss(block, states, samples, bs, dev))  # V = 0: RTN
        rtn_loss = sum(rtn_per_sample) / len(rtn_per_sample)
        best_score, best_iter = 1.0, 0  # iteration 0 is RTN itself
        best: list[list[Tensor]] | None = None  # None: RTN (reset_to_rtn), no copy kept
        for it in range(iters + 1):  # iteration `iters` only evaluates the last update
            if len(order) < bs:
                order += torch.randperm(total, generator=gen).tolist()
            idx, order = order[:bs], order[bs:]
            local = members(idx)
            need_grad = it < iters
            with torch.set_grad_enabled(need_grad):
                if local:
                    x = torch.cat([samples[i][0] for i in local], 0).to(dev, torch.float32)
                    y = torch.cat([samples[i][2] for i in local], 0).to(dev, torch.float32)
                    kw = _to_device(_collate([samples[i][1] for i in local]), dev)
                    weights = {f"{t.name}.weight": t.fake_quant() for t in states}
                    out = _block_out(functional_call(block, weights, (x,), kw))
                    # this rank's share of the minibatch's mean squared error (the mean over all len(idx) samples)
                    loss = (out - y).pow(2).sum() / (out[0].numel() * len(idx))
                else:  # no member of this minibatch here: a zero share, but the same collectives as the others
                    loss = sum(t.fake_quant().sum() * 0.0 for t in states) if need_grad else torch.zeros(())
            loss_all = all_reduce_scalar(float(loss.detach()))
            score = loss_all / max(sum(rtn_per_sample[i] for i in idx) / len(idx), 1e-30)
            if score < best_score:
                best_score, best_iter = score, it
                if best is None:
                    best = [t.snapshot() for t in states]
                else:  # into the same tensors: never two copies of every Linear's state at once
                    for t, b in zip(states, best):
                        t.save_into(b)
            if not need_grad:
                break
            # allow_unused: an MoE expert no token of this minibatch was routed to gets no gradient
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            _sum_over_ranks(grads)
            step = lr * (1.0 - it / iters)  # linear decay to 0
            with torch.no_grad():
                torch._foreach_sign_(grads)  # in place: no second copy of every gradient
                torch._foreach_add_(params, grads, alpha=-step)
            del grads
            for t in states:
                t.clamp_(min_range)
        for i, t in enumerate(states):
            if best is None:
                t.reset_to_rtn()
            else:
                t.restore(best[i])
        del best
        best_loss = rtn_loss
        if best_iter > 0:  # confirm on every sample; few or large steps can win one minibatch only
            best_loss = sum(all_gather_floats(_per_sample_loss(block, states, samples, bs, dev))) / total
            if best_loss >= rtn_loss:
                log.info("autoround: iterate %d (loss %.4g) is not better than RTN (%.4g) on all samples; "
                         "keeping RTN", best_iter, best_loss, rtn_loss)
                best_iter, best_loss = 0, rtn_loss
                for t in states:
                    t.reset_to_rtn()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        block.train(was_training)
    seconds = time.perf_counter() - t0
    log.info("autoround block: loss %.3g -> %.3g (best at iter %d of %d) in %.1fs",
             rtn_loss, best_loss, best_iter, iters, seconds)

    results = {}
    for t in states:
        q, scale, zero = t.finalize()
        w_hat = P.dequantize(q, scale, zero, t.scheme.group_for(t.w.shape[1]))
        stats = {"loss": best_loss, "best_loss": best_loss, "rtn_loss": rtn_loss, "best_iter": best_iter, "iters": iters,
                 "seconds": seconds}
        results[t.name] = QuantResult(PackedWeight.from_codes(q, scale, zero, t.scheme),
                                      P.relative_error(t.w, w_hat), stats)
    return results


def _sum_over_ranks(grads: list[Tensor]) -> None:
    """Sum gradients over the ranks in place (one flat all-reduce); nothing with one process."""
    if rank_world()[1] == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@ALGORITHMS.register("autoround")
class AutoRound(Algorithm):
    """Settings: iters (200), lr (1/iters), batch_size (8 samples), seed (0), learn_range (True),
    min_range (0.5: the smallest multiplier of a group's range)."""

    name = "autoround"
    needs_calibration = True
    granularity = "block"

    def quantize_block(
        self,
        block: nn.Module,
        plan: dict[str, QuantScheme],
        inputs: list[Tensor],
        kwargs: list[dict],
        targets: list[Tensor],
    ) -> dict[str, QuantResult]:
        s = self.settings
        return autoround_block(
            block, plan, inputs, kwargs, targets,
            iters=int(s.get("iters", 200)),
            lr=None if s.get("lr") is None else float(s["lr"]),
            batch_size=int(s.get("batch_size", 8)),
            learn_range=bool(s.get("learn_range", True)),
            min_range=float(s.get("min_range", 0.5)),
            seed=int(s.get("seed", 0)),
        )
