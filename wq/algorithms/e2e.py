"""End-to-end tuning of the group scales only, after every block is quantized (EfficientQAT's second phase,
written from the idea in wq's terms).

The integer codes and zero points stay as the block algorithm chose them; every QuantLinear's fp16 group
scales become trainable (as multipliers, rounded to fp16 in the forward with a straight-through
gradient, so what is trained is what is stored), and Adam fits the whole quantized model's final hidden
states (after the last norm, before the head) to the unquantized model's on the calibration samples.
Blocks are tuned together, so the scales can trade error between layers that block-wise training saw
in isolation. Memory: the quantized model plus one fp32 copy of the codes; the head is not run.
The export is unchanged in form: the same tensors with new scales.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import Tensor, nn

from ..calib.distributed import all_reduce_grads_, all_reduce_scalar
from ..nn import QuantLinear, set_module
from .samples import SampleIndex

log = logging.getLogger(__name__)


class _Tunable(nn.Module):
    """A QuantLinear's weight as (q - z) * (s0 * m)[g_idx], m trainable [n_groups, out]."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        pw = q.packed
        self.source = q
        gi = pw.group_index()  # [in]
        self.register_buffer("qz", (pw.codes().float() - pw.zeros.float()[gi].t()))  # [out, in]
        self.register_buffer("s0", pw.scales.float())  # [n_groups, out]
        self.register_buffer("gi", gi)
        self.m = nn.Parameter(torch.ones_like(self.s0))
        self.bias = None if q.bias is None else q.bias.detach().float()

    def scales(self) -> Tensor:
        s = self.s0 * self.m
        return s + (s.half().float() - s).detach()  # fp16 storage value, straight-through

    def forward(self, x: Tensor) -> Tensor:
        w = self.qz * self.scales()[self.gi].t()  # [out, in]
        return torch.nn.functional.linear(x.float(), w, self.bias).to(x.dtype)

    @torch.no_grad()
    def write_back(self) -> QuantLinear:
        """The QuantLinear with the tuned scales, written in place (the version bump makes its kernels re-plan)."""
        self.source.scales.copy_(self.scales().half())
        return self.source


def _final_hidden(model: nn.Module, ids: Tensor) -> Tensor:
    base = getattr(model, "model", None) or model.base_model
    return base(input_ids=ids, use_cache=False).last_hidden_state.float()


@torch.no_grad()
def fp_targets(model: nn.Module, samples: Tensor) -> list[Tensor]:
    """Final hidden states of the (still unquantized) model, one [1, L, hidden] per sample, on CPU."""
    dev = next(model.parameters()).device
    return [_final_hidden(model, s[None].to(dev)).cpu() for s in samples]


def e2e_tune_scales(model: nn.Module, samples: Tensor, targets: list[Tensor], *, steps: int, lr: float = 1e-3,
                    seed: int = 0) -> dict:
    """Tune every QuantLinear's scales end to end; samples [n, L] token ids of this rank, targets from
    fp_targets. One sample per step (global order, so torchrun ranks agree); cosine learning rate.
    Returns stats (loss before / after on all samples, steps, seconds)."""
    t0 = time.perf_counter()
    qnames = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not qnames or steps <= 0:
        return {}
    tunables = {n: _Tunable(model.get_submodule(n)) for n in qnames}
    for n, t in tunables.items():
        set_module(model, n, t)
    frozen = [p for p in model.parameters() if p.requires_grad and not any(p is t.m for t in tunables.values())]
    for p in frozen:
        p.requires_grad_(False)
    params = [t.m for t in tunables.values()]
    dev = next(model.parameters()).device
    index = SampleIndex(samples.shape[0])
    try:
        def loss_all() -> float:
            sse, numel = 0.0, 0
            with torch.no_grad():
                for i in range(samples.shape[0]):
                    y = targets[i].to(dev)
                    sse += float((_final_hidden(model, samples[i:i + 1].to(dev)) - y).pow(2).sum())
                    numel += y.numel()
            return all_reduce_scalar(sse) / max(all_reduce_scalar(numel), 1.0)

        before = loss_all()
        opt = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))
        batches = index.minibatches(1, seed)
        for p in params:
            p.grad = torch.zeros_like(p)
        for it in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / steps))
            opt.zero_grad(set_to_none=False)
            idx = next(batches)
            numel = all_reduce_scalar(sum(targets[i].numel() for i in idx))
            for i in idx:
                y = targets[i].to(dev)
                ((_final_hidden(model, samples[i:i + 1].to(dev)) - y).pow(2).sum() / numel).backward()
            all_reduce_grads_(params)
            opt.step()
        after = loss_all()
        if after >= before:
            log.info("e2e: final-state loss %.4g not below %.4g; keeping the block-wise scales", after, before)
            with torch.no_grad():
                for p in params:
                    p.fill_(1.0)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for n, t in tunables.items():
            set_module(model, n, t.write_back())
    stats = {"e2e_loss_before": before, "e2e_loss_after": min(after, before), "e2e_steps": steps,
             "e2e_seconds": time.perf_counter() - t0}
    log.info("e2e scales: final-state loss %.4g -> %.4g in %d steps, %.1fs", before, stats["e2e_loss_after"], steps,
             stats["e2e_seconds"])
    return stats
