"""Learned block reconstruction: train the group scales, zero points and rounding of a whole decoder
block together, with Adam, on the block's output error against the full-precision stream.

Written from the published idea shared by OmniQuant's learnable clipping, EfficientQAT's block-wise
phase and TesseraQ (learn the quantization parameters *with* the rounding, by gradient descent on
each block's output, from a good initialization), in wq's own terms. Per quantized Linear:

    s0, z0, q0   the initial quantizer's scales, zero points and codes (gptq, autoround or rtn)
    m  [out, ng, 1]   scale multiplier, init 1              s = fp16(s0 * m)  (straight-through)
    z  [out, ng, 1]   zero point, asymmetric only, init z0  z_int = round(z)  (straight-through)
    v  [out, ng, G]   rounding offset in code units, initialised so that round(W/s0 + v) = q0 - z0
                      exactly, keeping W's own fraction where it agrees with q0
    w_hat = (clamp(round(W/s + v) + z_int, 0, maxq) - z_int) * s

so training starts at exactly the initial quantizer's weights, every forward uses integer zero points
and fp16-exact scales (what the checkpoint stores), and the export is plain codes/scales/zeros.
The loss is the block output's mean squared error against `targets` (the unquantized model's hidden
states), summed over samples and divided by the global element count, so torchrun ranks holding
shares of the samples reproduce one process (gradients and losses are all-reduced). Schedule: cosine
decay of the learning rates over `iters` steps; early stop when an epoch over the samples improves the
loss by less than `tol`; the trained weights are kept only if their loss on all samples beats the
initialization's.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .. import primitives as P
from ..calib.distributed import all_reduce_grads_, all_reduce_scalar
from ..packing import PackedWeight
from ..scheme import QuantScheme
from ..transforms.weights import linear_weight, module_weight
from .autoround import _block_out, _collate, _samples, _to_device, autoround_block
from .base import ALGORITHMS, Algorithm, QuantResult
from .fake_quant import FakeQuant, ste_fp16, ste_round
from .gptq import gptq_quantize
from .hessian import block_hessians
from .rtn import rtn_quantize
from .samples import SampleIndex

log = logging.getLogger(__name__)

INITS = ("rtn", "gptq", "autoround")
_FRAC = 0.45  # how much of W's own rounding fraction the offsets keep at init (< 0.5: codes stay q0)


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
class _Layer(_Snapshots):
    """One Linear's trainable quantizer, in the grouped, zero-padded view [out, ng, G]."""

    name: str
    scheme: QuantScheme
    module: nn.Module
    w: Tensor  # [out, in] fp32, original weights
    wg: Tensor  # [out, ng, G]
    s0: Tensor  # [out, ng, 1] initial scales (fp16-exact)
    m: Tensor  # [out, ng, 1] scale multiplier (trained)
    z: Tensor  # [out, ng, 1] zero point (trained when asymmetric, else constant 2^(b-1))
    v: Tensor  # [out, ng, G] rounding offsets (trained)

    @classmethod
    def from_result(cls, name: str, module: nn.Module, scheme: QuantScheme, result: QuantResult) -> _Layer:
        pw = result.packed
        if pw.g_idx is not None:
            raise ValueError(f"recon: {name}'s initial quantization has a permuted g_idx (act-order without "
                             "static groups); use static groups or no act-order for the initializer")
        w = linear_weight(module).detach().float()
        G = scheme.group_for(w.shape[1])
        wg = P.group_view(w, G)
        q0 = P.group_view(pw.codes().float().to(w.device), G)
        s0 = pw.scales.t().float().to(w.device)[..., None]
        z0 = pw.zeros.t().float().to(w.device)[..., None]
        base = q0 - z0  # the integer grid point of each weight
        u = wg * (1.0 / s0)  # same arithmetic as FakeQuant, so round(u + v) is exactly base
        v = base + (u - base).clamp(-_FRAC, _FRAC) - u
        return cls(name, scheme, module, w, wg, s0, torch.ones_like(s0, requires_grad=True),
                   z0.clone().requires_grad_(not scheme.sym), v.requires_grad_(True))

    def params(self) -> list[Tensor]:
        return [self.v, self.m] + ([self.z] if not self.scheme.sym else [])

    def qparams(self) -> tuple[Tensor, Tensor]:
        s = ste_fp16(self.s0 * self.m)
        if self.scheme.sym:
            return s, self.z
        return s, torch.clamp(ste_round(self.z), 0, self.scheme.maxq)

    def fake_quant(self) -> Tensor:
        """w_hat [out, in], differentiable in (v, m, z)."""
        s, z = self.qparams()
        w_hat = FakeQuant.apply(self.wg, self.v, s, z, self.scheme.maxq).flatten(1)
        return w_hat[:, : self.w.shape[1]]

    @torch.no_grad()
    def finalize(self) -> QuantResult:
        s, z = self.qparams()
        qf = torch.round(self.wg * (1.0 / s) + self.v).add_(z).clamp_(0, self.scheme.maxq)  # as FakeQuant
        q = qf.flatten(1)[:, : self.w.shape[1]].to(torch.int32)
        s, z = s.squeeze(2), z.squeeze(2)
        w_hat = P.dequantize(q, s, z, self.scheme.group_for(self.w.shape[1]))
        return QuantResult(PackedWeight.from_codes(q, s, z, self.scheme), P.relative_error(self.w, w_hat))


def initial_results(block: nn.Module, plan: dict[str, QuantScheme], inputs: list[Tensor], kwargs: list[dict],
                    targets: list[Tensor], init: str, *, mse: bool = False, damp: float = 0.01,
                    block_size: int = 128, init_iters: int = 50, init_lr: float | None = None,
                    batch_size: int = 1, seed: int = 0) -> dict[str, QuantResult]:
    """The starting point: gptq (Hessians of the block's own inputs), autoround (one sample per step, as recon
    trains: the better use of the same compute on SmolLM2 blocks), or rtn."""
    if init == "rtn":
        return {n: rtn_quantize(linear_weight(block.get_submodule(n)), s, mse=mse) for n, s in plan.items()}
    if init == "gptq":
        H = block_hessians(block, list(plan), inputs, kwargs)
        return {n: gptq_quantize(linear_weight(block.get_submodule(n)), H[n], s, block=block_size, damp=damp, mse=mse)
                for n, s in plan.items()}
    if init == "autoround":
        return autoround_block(block, plan, inputs, kwargs, targets, iters=init_iters, lr=init_lr,
                               batch_size=batch_size, seed=seed)
    raise ValueError(f"recon: init={init!r}; choose one of {', '.join(INITS)}")


def _forward(block: nn.Module, layers: list[_Layer], samples: list, idx: list[int], dev, weights=None):
    """(sum of squared errors, element count) of the samples `idx` (local)."""
    x = torch.cat([samples[i][0] for i in idx], 0).to(dev, torch.float32)
    y = torch.cat([samples[i][2] for i in idx], 0).to(dev, torch.float32)
    kw = _to_device(_collate([samples[i][1] for i in idx]), dev)
    if weights is None:
        weights = {f"{t.name}.weight": module_weight(t.module, t.fake_quant()) for t in layers}
    out = _block_out(functional_call(block, weights, (x,), kw))
    return (out - y).pow(2).sum(), y.numel()


@torch.no_grad()
def _mean_loss(block: nn.Module, layers: list[_Layer], samples: list, idx: list[int], dev) -> float:
    """Mean squared error over the local samples `idx`, summed with the other ranks' (one collective each)."""
    weights = {f"{t.name}.weight": module_weight(t.module, t.fake_quant()) for t in layers}
    sse, numel = 0.0, 0
    for i in idx:
        e, k = _forward(block, layers, samples, [i], dev, weights)
        sse += float(e)
        numel += k
    return all_reduce_scalar(sse) / max(all_reduce_scalar(numel), 1.0)


def recon_block(
    block: nn.Module,
    plan: dict[str, QuantScheme],
    inputs: list[Tensor],
    kwargs: list[dict],
    targets: list[Tensor],
    *,
    init: str = "rtn",
    init_results: dict[str, QuantResult] | None = None,
    iters: int = 200,
    lr: float | None = None,
    scale_lr: float | None = None,
    batch_size: int = 1,
    tol: float = 1e-3,
    betas: tuple[float, float] = (0.5, 0.9),
    check_samples: int = 8,
    seed: int = 0,
    **init_settings,
) -> dict[str, QuantResult]:
    """Quantize every Linear of `plan` (names relative to `block`) by learned reconstruction.

    inputs/kwargs/targets as in the block contract of wq.calib.pipeline (quantized-stream inputs,
    full-precision-stream targets). init: the initial quantizer, rtn / gptq with MSE-searched group
    ranges, or autoround (or pass `init_results`); iters: Adam steps, batch_size samples each; lr:
    step of the rounding offsets in code units (default 0.02), scale_lr: of the scale multipliers and
    zero points (default 1.5 lr); betas: Adam's (short memories suit a few hundred noisy steps);
    tol: early-stop threshold on the relative improvement of an epoch's loss; check_samples: how many
    samples decide between the trained and the initial weights at the end. The block's weights are
    left untouched. stats: loss (kept, on the check samples), init_loss, steps (taken), seconds.

    Defaults measured on SmolLM2 blocks at W2G128 (docs/quality.md): at 80 steps, batch 1 beat batch
    2 and 4 at equal compute, betas (0.5, 0.9) beat (0.9, 0.999), rtn init beat gptq init.
    """
    if iters < 0:
        raise ValueError(f"recon: iters={iters} must be >= 0")
    t0 = time.perf_counter()
    dev = next(block.parameters()).device
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    was_training = block.training
    block.eval()
    try:
        if init_results is None:
            init_settings = {"mse": True, **init_settings}
            init_results = initial_results(block, plan, inputs, kwargs, targets, init, seed=seed, **init_settings)
        layers = [_Layer.from_result(n, block.get_submodule(n), s, init_results[n]) for n, s in plan.items()]
        for t in layers:
            if not t.scheme.is_int:
                raise ValueError(f"recon: {t.name} has float scheme {t.scheme}; use an integer scheme")
        samples = _samples(inputs, kwargs, targets)
        if not samples:
            raise ValueError("recon needs calibration samples (inputs is empty)")
        index = SampleIndex(len(samples))  # global sample indices: torchrun ranks pick the same minibatches
        batches = index.minibatches(batch_size, seed)
        check = index.first(check_samples)
        init_loss = _mean_loss(block, layers, samples, check, dev)
        init_state = [t.snapshot() for t in layers]
        lr = 0.02 if lr is None else lr
        scale_lr = 1.5 * lr if scale_lr is None else scale_lr
        groups = [{"params": [t.v for t in layers], "lr": lr},
                  {"params": [p for t in layers for p in t.params()[1:]], "lr": scale_lr}]
        opt = torch.optim.Adam(groups, lr=lr, betas=betas, foreach=True)
        base_lrs = [g["lr"] for g in groups]
        params = [p for t in layers for p in t.params()]
        for p in params:
            p.grad = torch.zeros_like(p)
        steps_per_epoch = max(1, math.ceil(index.n / max(1, min(batch_size, index.n))))
        epoch_sse, epoch_numel, prev_epoch, steps = 0.0, 0.0, None, 0
        for it in range(iters):
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * 0.5 * (1.0 + math.cos(math.pi * it / iters))
            opt.zero_grad(set_to_none=False)
            idx = next(batches)
            numel = all_reduce_scalar(sum(samples[i][2].numel() for i in idx))
            sse = 0.0
            if idx:
                e, _ = _forward(block, layers, samples, idx, dev)
                (e / numel).backward()
                sse = float(e.detach())
            all_reduce_grads_(params)
            opt.step()
            steps += 1
            epoch_sse += all_reduce_scalar(sse)
            epoch_numel += numel
            if steps % steps_per_epoch == 0:
                loss = epoch_sse / max(epoch_numel, 1.0)
                if prev_epoch is not None and loss > prev_epoch * (1.0 - tol):
                    log.debug("recon: epoch loss %.4g after %.4g: stopping at step %d of %d", loss, prev_epoch,
                              steps, iters)
                    break
                prev_epoch, epoch_sse, epoch_numel = loss, 0.0, 0.0
        loss = _mean_loss(block, layers, samples, check, dev) if steps else init_loss
        if loss >= init_loss:
            log.info("recon: trained loss %.4g is not below the %s initialization's %.4g; keeping the latter",
                     loss, init, init_loss)
            for t, s in zip(layers, init_state):
                t.restore(s)
            loss = init_loss
        results = {}
        seconds = time.perf_counter() - t0
        for t in layers:
            r = t.finalize()
            r.stats = {"loss": loss, "init_loss": init_loss, "init": init, "steps": steps, "iters": iters,
                       "seconds": seconds}
            results[t.name] = r
    finally:
        for p in frozen:
            p.requires_grad_(True)
        block.train(was_training)
    log.info("recon block: loss %.3g (%s) -> %.3g in %d steps, %.1fs", init_loss, init, loss, steps, seconds)
    return results


@ALGORITHMS.register("recon")
class Recon(Algorithm):
    """Settings: init (rtn | gptq | autoround), iters (200 Adam steps per block), lr (0.02), scale_lr (1.5 lr),
    recon_batch (1 sample per step), tol (1e-3), seed; for the initializer: damp, block_size (gptq),
    init_iters (autoround, 50). The pipeline's batch_size only batches its own forwards."""

    name = "recon"
    needs_calibration = True
    granularity = "block"
    # V, Adam's two moments, its gradient and the best iterate (4 each), an fp32 copy of the weights (4), the saved
    # w_hat (4), codes and clamp mask (2)
    state_bytes_per_weight = state_bytes_per_weight_ranks = 30.0

    def quantize_block(self, block: nn.Module, plan: dict[str, QuantScheme], inputs: list[Tensor],
                       kwargs: list[dict], targets: list[Tensor]) -> dict[str, QuantResult]:
        s = self.settings
        opt = {k: s[k] for k in ("damp", "block_size", "init_iters") if s.get(k) is not None}
        return recon_block(
            block, plan, inputs, kwargs, targets,
            init=str(s.get("init") or "rtn"),
            iters=int(s.get("iters", 200)),
            lr=None if s.get("lr") is None else float(s["lr"]),
            scale_lr=None if s.get("scale_lr") is None else float(s["scale_lr"]),
            batch_size=int(s.get("recon_batch") or 1),
            tol=float(s.get("tol", 1e-3)),
            seed=int(s.get("seed", 0)),
            **opt,
        )
