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

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import primitives as P
from ..calib.distributed import all_gather_floats, all_reduce_scalar, all_reduce_sum_, offsets, rank_world
from ..packing import PackedWeight
from ..scheme import QuantScheme
from .base import ALGORITHMS, Algorithm, QuantResult
from .fake_quant import (
    codes,
    linear_by_rows,
    patched_forwards,
    quant_linear,
    quantized_forwards,
    ste_fp16,
    ste_round,
)
from .gated_mlp import gated_up
from .kept_codes import KeptCodes
from .offsets import IntOffsets

log = logging.getLogger(__name__)

# --low-mem: autoround forwards and differentiates at most this many tokens at once (whole samples, at least one):
# one 2048-token sample at the CLI's default seqlen, the whole minibatch of short samples
LOW_MEM_MICRO_TOKENS = 2048
_RESULT_CHUNK = 1 << 20  # weights per row chunk when the results are packed

# kwargs a decoder block gets during a full-model forward that make no sense when replaying it
_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "cache_position", "output_attentions")


@dataclass
class _Target:
    """One Linear's learnable rounding state. The weights stay in the Linear's own storage (bf16 in a streamed
    run: read in fp32 one Linear at a time, which is exact) and the grouped view [out, ng, G] is made where it
    is used; V is held as integers (wq.algorithms.offsets, 2 bytes a weight) and wq.algorithms.fake_quant
    keeps no per-weight autograd state beyond the weights and V."""

    name: str  # relative to the block, e.g. "self_attn.q_proj"
    scheme: QuantScheme
    w: Tensor  # [out, in] the Linear's weights as stored (not copied)
    bias: Tensor | None  # [out] fp32
    wmax: Tensor  # [out, ng, 1] max(w, 0)  (sym: absmax)
    wmin: Tensor  # [out, ng, 1] min(w, 0)  (sym: unused)
    v: IntOffsets  # [out, ng, G] rounding offsets, exact integer multiples of the smallest step
    alpha: Tensor | None  # [out, ng, 1] range multipliers, require grad (None: no range learning)
    beta: Tensor | None
    sym_factor: Tensor | None = None  # [out, ng, 1] sym scale = alpha * absmax * factor (P.sym_scale_factor)
    kept: KeptCodes | None = None  # [out, ng, G] codes of the restored best iterate (None: from v)

    @classmethod
    def make(cls, name: str, module: nn.Module, scheme: QuantScheme, learn_range: bool, lr: float,
             iters: int) -> _Target:
        w = module.weight.detach()
        wg = P.group_view(w.float(), scheme.group_for(w.shape[1]))  # transient
        wmin = wg.amin(dim=2, keepdim=True).clamp(max=0)
        wmax = wg.amax(dim=2, keepdim=True).clamp(min=0)
        factor = None
        if scheme.sym:
            factor = P.sym_scale_factor(wmin, wmax, scheme)
            wmax = torch.maximum(wmin.abs(), wmax)
        ones = torch.ones_like(wmax)
        alpha = ones.clone().requires_grad_(True) if learn_range else None
        beta = ones.clone().requires_grad_(True) if learn_range and not scheme.sym else None
        bias = None if getattr(module, "bias", None) is None else module.bias.detach().float()
        v = IntOffsets(wg.shape, lr, iters, device=w.device)
        return cls(name, scheme, w, bias, wmax, wmin, v, alpha, beta, factor)

    def _ranges(self) -> list[Tensor]:
        return [p for p in (self.alpha, self.beta) if p is not None]

    def qparams(self) -> tuple[Tensor, Tensor]:
        """(scale, zero) [out, ng, 1], differentiable through straight-through rounding."""
        maxq = self.scheme.maxq
        hi = self.wmax if self.alpha is None else self.wmax * self.alpha
        if self.scheme.sym:
            s = ste_fp16(hi * self.sym_factor)
            return s, torch.full_like(s, float(2 ** (self.scheme.bits - 1)))
        lo = self.wmin if self.beta is None else self.wmin * self.beta
        s = ste_fp16((hi - lo) / maxq)
        z = torch.clamp(ste_round(-lo / s), 0, maxq)
        return s, z

    def forward(self, x: Tensor) -> Tensor:
        """The Linear on x [..., in] with its fake-quantized weights, differentiable in (V, alpha, beta)."""
        s, z = self.qparams()
        if self.kept is None:
            return quant_linear(x, self.w, s, z, self.scheme.maxq, self.bias, self.v)
        in_f = self.w.shape[1]

        def w_hat_rows(r0: int, r1: int) -> Tensor:  # [rows, in]
            return ((self.kept.rows(r0, r1).float() - z[r0:r1]) * s[r0:r1]).flatten(1)[:, :in_f]

        return linear_by_rows(x, w_hat_rows, self.bias, *self.w.shape)

    # the best iterate is kept as its codes, several to a byte (wq.algorithms.kept_codes: 1/2 byte a weight at
    # W4, not V's 2) and its range multipliers: the codes are all the export and the final loss need
    @torch.no_grad()
    def snapshot(self) -> list:
        s, z = self.qparams()
        kept = KeptCodes(codes(self.w, self.v, s, z, self.scheme.maxq), self.scheme.bits)
        return [kept] + [p.detach().clone() for p in self._ranges()]

    @torch.no_grad()
    def save_into(self, saved: list) -> None:
        s, z = self.qparams()
        saved[0].copy_(codes(self.w, self.v, s, z, self.scheme.maxq))
        for p, t in zip(self._ranges(), saved[1:]):
            t.copy_(p)

    @torch.no_grad()
    def restore(self, saved: list) -> None:
        self.kept = saved[0]
        for p, t in zip(self._ranges(), saved[1:]):
            p.copy_(t)

    @torch.no_grad()
    def reset_to_rtn(self) -> None:
        """Back to the starting point, round-to-nearest: no offsets, full ranges (no snapshot needed)."""
        self.kept = None
        self.v.zero_()
        for p in self._ranges():
            p.fill_(1.0)

    def range_bounds(self, min_range: float) -> list[tuple[Tensor, float, float]]:
        """(parameter, lowest, highest) of every range multiplier (V keeps its own bound)."""
        return [(p, min_range, 1.0) for p in self._ranges()]

    @torch.no_grad()
    def result(self, stats: dict) -> QuantResult:
        """The packed weight (codes under wq.primitives conventions: fp16-exact scales, integer zeros) and its
        relative error, a few rows at a time: no [out, in] copy of the codes or of w_hat is made. V is released
        first (the kept codes, or V = 0 after reset_to_rtn, are all that is left to export)."""
        s, z = (t.detach() for t in self.qparams())  # [out, ng, 1]
        assert torch.equal(s, P.round_scale(s))
        G = self.v.shape[2]
        self.v.release()
        out_f, in_f = self.w.shape
        maxq = self.scheme.maxq
        parts, err, ref = [], 0.0, 0.0
        for r0, r1 in P.row_chunks(out_f, in_f, _RESULT_CHUNK):
            sc, zc = s[r0:r1], z[r0:r1]
            wg = P.group_view(self.w[r0:r1].float(), G)
            if self.kept is not None:
                q = self.kept.rows(r0, r1).float()
            else:  # only after reset_to_rtn (V = 0): wq.primitives' own rounding (w / s), exactly rtn's codes
                q = torch.clamp(torch.round(wg / sc) + zc, 0, maxq)
            diff = (q - zc).mul_(sc).sub_(wg).flatten(1)[:, :in_f]
            err += float(diff.pow(2).sum())
            ref += float(wg.pow(2).sum())  # the padding is zero
            parts.append(PackedWeight.from_codes(q.flatten(1)[:, :in_f].to(torch.int32), sc.squeeze(2),
                                                 zc.squeeze(2), self.scheme))
        return QuantResult(PackedWeight.cat_out(parts), (err / max(ref, 1e-24)) ** 0.5, stats)


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
    """MSE of every calibration sample with the current fake-quantized weights (inside quantized_forwards)."""
    losses: list[float] = []
    for j in range(0, len(samples), bs):
        chunk = samples[j : j + bs]
        x = torch.cat([c[0] for c in chunk], 0).to(dev, torch.float32)
        y = torch.cat([c[2] for c in chunk], 0).to(dev, torch.float32)
        kw = _to_device(_collate([c[1] for c in chunk]), dev)
        out = _block_out(block(x, **kw))
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
    micro_tokens: int = 0,
    recompute_mlp: bool = False,
) -> dict[str, QuantResult]:
    """Signed-gradient rounding of every Linear named in `plan` (names relative to `block`).

    micro_tokens: tokens per forward and backward, in whole samples (at least one; 0: the whole minibatch at
    once). Fewer hold fewer activations and add one fp32 gradient of the block's rounding offsets (4 bytes a
    weight), summed over the micro-batches before each step: the same update up to the order of addition.
    recompute_mlp: a gated MLP (wq.algorithms.gated_mlp) keeps only its input through the backward and recomputes
    gate's and up's outputs a slice at a time (2 more matmuls, one tensor of its width less).

    inputs/targets: per calibration batch, [b, T, H] hidden states into / out of the unquantized
    block; kwargs: the other arguments of each call (rotary tables, masks). The block's own weights
    are left untouched; returns {name: QuantResult} with stats loss (= best_loss, the kept iterate's
    MSE over all samples), rtn_loss (RTN's), best_iter (0: RTN kept).
    """
    if iters < 0:
        raise ValueError(f"autoround: iters={iters} must be >= 0")
    lr = 1.0 / max(iters, 1) if lr is None else lr
    states = [_Target.make(n, block.get_submodule(n), s, learn_range, lr, iters) for n, s in plan.items()]
    for t in states:
        if not t.scheme.is_int:
            raise ValueError(f"autoround: {t.name} has float scheme {t.scheme}; use an integer scheme")
    tokens = [t.v.token for t in states]
    ranges = [(p, lo, hi) for t in states for p, lo, hi in t.range_bounds(min_range)]
    samples = _samples(inputs, kwargs, targets)
    # under torchrun each rank holds a contiguous share of the samples: minibatches are drawn from the global
    # indices (the same draw on every rank), each rank computes its members' part of the loss (normalised by
    # the global minibatch), and the gradients are summed over the ranks: one process's run, split
    first, total = offsets(len(samples))
    if not total:
        raise ValueError("autoround needs calibration samples (inputs is empty)")
    bs = max(1, min(batch_size, total))
    micro_batch = max(1, micro_tokens // samples[0][0].shape[1]) if micro_tokens > 0 and samples else 0
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
    # with several ranks the gradients are summed first (all at once); with one, a parameter's signed step is
    # taken in the backward, as soon as its gradient is complete, so the block's gradients are never all held
    stepper = _SignedSteps(states, min_range) if rank_world()[1] == 1 else None
    try:
        with quantized_forwards({block.get_submodule(t.name): t.forward for t in states}), \
                patched_forwards(_gated_mlps(block, states, dev, recompute_mlp)):
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
                step = lr * (1.0 - it / max(iters, 1))  # linear decay to 0
                if stepper is not None:
                    stepper.arm(it, step)
                # this rank's share of the minibatch's mean squared error (the mean over all len(idx) samples); every
                # micro-batch but the last is differentiated here (gradients summed, no step yet)
                loss_sum, loss = _minibatch_loss(block, samples, local, len(idx), dev, micro_batch, need_grad, stepper)
                loss_all = all_reduce_scalar(loss_sum)
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
                if stepper is not None:  # one process: each parameter steps as soon as its gradient is complete
                    if loss.requires_grad:
                        loss.backward()
                    stepper.finish()
                    continue
                # several ranks: every gradient first, summed over the ranks, then the same steps. dL/dV lands in
                # each Linear's offsets (the tokens' own gradients are zeros); an MoE expert no token of this
                # minibatch was routed to gets no gradient (zeros: no step)
                if loss.requires_grad:
                    loss.backward()
                grads = [t.v.take_grad() for t in states]
                for p in tokens:
                    p.grad = None
                for p, _, _ in ranges:
                    g, p.grad = p.grad, None
                    grads.append(torch.zeros_like(p) if g is None else g)
                _sum_over_ranks(grads)
                with torch.no_grad():
                    for t, g in zip(states, grads):
                        t.v.signed_step_(g, it)
                    for (p, lo, hi), g in zip(ranges, grads[len(states):]):
                        _range_step_(p, g, step, lo, hi)
                del grads
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
        if stepper is not None:
            stepper.remove()
        for p in frozen:
            p.requires_grad_(True)
        block.train(was_training)
    seconds = time.perf_counter() - t0
    log.info("autoround block: loss %.3g -> %.3g (best at iter %d of %d) in %.1fs",
             rtn_loss, best_loss, best_iter, iters, seconds)

    stats = {"loss": best_loss, "best_loss": best_loss, "rtn_loss": rtn_loss, "best_iter": best_iter, "iters": iters,
             "seconds": seconds}
    return {t.name: t.result(dict(stats)) for t in states}


def _gated_mlps(block: nn.Module, states: list[_Target], dev: torch.device, recompute: bool) -> dict[nn.Module, Callable]:
    """{mlp: forward} for every module of `block` computing down_proj(act_fn(gate_proj(x)) * up_proj(x)) with gate_proj
    and up_proj among `states`: its first half goes through wq.algorithms.gated_mlp (2 tensors of the intermediate
    width through the backward with `recompute`, 3 without, instead of ~7). Call inside quantized_forwards (the check runs the Linears as
    fake-quantized). Each candidate is checked first: its own forward on a few random tokens must give the same
    output as the fused one, or it keeps its own (a module named alike that computes something else)."""
    by_name = {t.name: t for t in states}
    out: dict[nn.Module, Callable] = {}
    for name, mod in block.named_modules():
        pre = f"{name}." if name else ""
        gate, up = by_name.get(pre + "gate_proj"), by_name.get(pre + "up_proj")
        act = getattr(mod, "act_fn", None)
        if gate is None or up is None or not callable(act) or not isinstance(getattr(mod, "down_proj", None), nn.Module):
            continue
        fwd = functools.partial(_gated_forward, mod, gate, up, act, recompute)
        probe = torch.randn(1, 4, gate.w.shape[1], generator=torch.Generator().manual_seed(0)).to(dev)
        with torch.no_grad():
            ref, got = type(mod).forward(mod, probe), fwd(probe)
        if isinstance(ref, Tensor) and ref.shape == got.shape and torch.allclose(ref, got, rtol=1e-4, atol=1e-6):
            out[mod] = fwd
        else:
            log.info("autoround: %s is not down_proj(act_fn(gate_proj(x)) * up_proj(x)); its own forward is used",
                     name or "the block")
    return out


def _gated_forward(mod: nn.Module, gate: _Target, up: _Target, act: Callable, recompute: bool, x: Tensor) -> Tensor:
    if gate.kept is not None or up.kept is not None:  # the best iterate's codes, no gradient: the module's own way
        return type(mod).forward(mod, x)
    sg, zg = gate.qparams()
    su, zu = up.qparams()
    h = gated_up(x, act, (gate.w, sg, zg, gate.scheme.maxq, gate.bias, gate.v),
                 (up.w, su, zu, up.scheme.maxq, up.bias, up.v), recompute)
    return mod.down_proj(h)


@torch.no_grad()
def _range_step_(p: Tensor, g: Tensor, step: float, lo: float, hi: float) -> None:
    """A range multiplier's signed step, p -= step * sign(g), clamped to [lo, hi]; g is overwritten."""
    p.add_(g.sign_(), alpha=-step).clamp_(lo, hi)


class _SignedSteps:
    """p -= step * sign(dL/dp), then p clamped to its range, run by autograd right after p's gradient is
    accumulated (a post-accumulate-grad hook); the gradient is dropped at once. V steps inside the fused
    Linear's backward (wq.algorithms.fake_quant), a few rows at a time, once its call's dL/dV is complete: this
    sets the offsets' step_at. The same arithmetic as the update of several ranks in autoround_block, one
    parameter at a time. While `last` is False (the backward of a micro-batch that is not the minibatch's last)
    gradients are only summed."""

    def __init__(self, states: list[_Target], min_range: float):
        self.offsets = [t.v for t in states]
        self.it, self.step, self._last = 0, 0.0, True
        self.handles = [t.v.token.register_post_accumulate_grad_hook(self._token_hook) for t in states]
        self.ranges = [(p, lo, hi) for t in states for p, lo, hi in t.range_bounds(min_range)]
        self.handles += [p.register_post_accumulate_grad_hook(self._hook(lo, hi)) for p, lo, hi in self.ranges]

    def arm(self, it: int, step: float) -> None:
        """Iteration `it` with step `step` begins: no call is pending, the next backward steps."""
        self.it, self.step = it, step
        for off in self.offsets:
            off.pending = 0
        self.last = True

    @property
    def last(self) -> bool:
        return self._last

    @last.setter
    def last(self, value: bool) -> None:
        self._last = value
        for off in self.offsets:
            off.step_at = self.it if value else None

    @staticmethod
    @torch.no_grad()
    def _token_hook(token: Tensor) -> None:
        token.grad = None  # a zero: dL/dV went into the offsets

    def _hook(self, lo: float, hi: float):
        @torch.no_grad()
        def hook(p: Tensor) -> None:
            if self._last:
                g, p.grad = p.grad, None
                _range_step_(p, g, self.step, lo, hi)
        return hook

    @torch.no_grad()
    def finish(self) -> None:
        """After the minibatch's last backward: step what was summed in earlier micro-batches but not reached by the
        last one (an MoE expert no token of it was routed to), as the path of several ranks does."""
        for off in self.offsets:
            if off.grad is not None:
                off.signed_step_(off.take_grad(), self.it)
            off.pending = 0
        for p, lo, hi in self.ranges:
            if p.grad is not None:
                g, p.grad = p.grad, None
                _range_step_(p, g, self.step, lo, hi)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for off in self.offsets:
            off.step_at = None


def _minibatch_loss(block: nn.Module, samples: list, local: list[int], n_idx: int, dev, micro_batch: int,
                    need_grad: bool, stepper: _SignedSteps | None) -> tuple[float, Tensor]:
    """(this rank's share of the minibatch loss, the loss tensor of its last micro-batch, not yet differentiated).
    With micro-batches, every one but the last is differentiated here with the one-process steps held back
    (gradients are summed into .grad and the offsets), so the caller's backward of the last completes them."""
    if not local:  # no member of this minibatch here: a zero share, but the same collectives as the others
        return 0.0, torch.zeros(())
    size = micro_batch if 0 < micro_batch < len(local) else len(local)
    pieces = [local[j:j + size] for j in range(0, len(local), size)]
    total = 0.0
    for n, piece in enumerate(pieces):
        with torch.set_grad_enabled(need_grad):
            x = torch.cat([samples[i][0] for i in piece], 0).to(dev, torch.float32)
            y = torch.cat([samples[i][2] for i in piece], 0).to(dev, torch.float32)
            kw = _to_device(_collate([samples[i][1] for i in piece]), dev)
            out = _block_out(block(x, **kw))
            loss = (out - y).pow(2).sum() / (out[0].numel() * n_idx)
        total += float(loss.detach())
        if n < len(pieces) - 1 and need_grad:
            if stepper is not None:
                stepper.last = False
            loss.backward()
            del loss, out
    if stepper is not None:
        stepper.last = True  # the caller's backward of the last micro-batch takes the steps
    return total, loss


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
    min_range (0.5: the smallest multiplier of a group's range), micro_tokens (see micro_tokens()), recompute_mlp
    (--low-mem's default: a gated MLP recomputes gate's and up's outputs in the backward)."""

    name = "autoround"
    needs_calibration = True
    granularity = "block"
    reads_16bit_weights = True  # _Target reads a Linear's weights in fp32 where used, never copies or writes them
    # V (2: int16 up to ~250 iterations at the default lr, 4 above) and the best iterate's codes (1/4 to 1, several
    # to a byte); the backward keeps no codes (rebuilt from w and V). Several ranks hold every gradient (4) for the
    # all-reduce; one process steps V rows at a time inside the backward and each range as its gradient completes
    state_bytes_per_weight = 3.0
    state_bytes_per_weight_ranks = 7.0
    # --low-mem: LOW_MEM_MICRO_TOKENS per forward and backward, the block's dL/dV summed over them (4 more)
    state_bytes_per_weight_low_mem = 7.0
    low_mem_tokens = LOW_MEM_MICRO_TOKENS
    # a gated MLP fused (wq.algorithms.gated_mlp): at down_proj's backward its input and dL/d(input), gate's and up's
    # outputs (recomputed under --low-mem: 2 fewer); an MLP that is not gated holds about as many through autograd
    backward_intermediates = 4
    backward_intermediates_low_mem = 3

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
            micro_tokens=self.micro_tokens(),
            recompute_mlp=bool(s.get("recompute_mlp", s.get("low_mem", False))),
        )

    def micro_tokens(self) -> int:
        """Tokens per forward/backward: the `micro_tokens` setting, else `low_mem_tokens` under --low-mem,
        else 0 (the whole minibatch at once)."""
        s = self.settings
        if s.get("micro_tokens") is not None:
            return int(s["micro_tokens"])
        return self.low_mem_tokens if s.get("low_mem") else 0
