"""AWQ: activation-aware per-channel scales, searched per block and folded into the weights, then a
weight quantizer on the scaled weights.

Written from the AWQ paper's idea in wq's terms. A Linear's input channels that see large activations
matter most; multiplying such a channel's weights by s > 1 (and dividing what feeds it by s) shrinks
their relative rounding error. For each place where that division can be folded exactly:

    attention norm -> attention readers (q/k/v ...)   inspected through the attention module
    v_proj         -> o_proj (per head; grouped-query heads share their value scales)
    mlp norm       -> mlp readers (gate/up, routers, experts)   inspected through the mlp module
    up_proj        -> down_proj (every gated MLP / expert)

s = mean|x|^alpha (normalised to geometric mean 1), alpha on a grid in [0, 1); the alpha whose
fake-quantized weights (round to nearest) reproduce the inspected module's output best on the block's
calibration inputs wins (alpha = 0 is no scaling). The scales are folded (wq.transforms.fold), which
leaves the unquantized block's function unchanged, and the scaled weights are then quantized by
`quantizer`: rtn (with a per-group clipping search on the layer's output error, AWQ's second step),
gptq (Hessians of the scaled block), or a block algorithm (autoround, recon) on the scaled block.
The export is a plain weight-only checkpoint: the scales live in the norms and weights.

Contract note (wq.calib.pipeline, granularity "block"): AWQ changes the block's unquantized modules
(norm scales, unplanned readers) in place on purpose; the block's function is unchanged, so the
full-precision targets stay valid.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .. import primitives as P
from ..calib.distributed import all_reduce_scalar, all_reduce_sum_
from ..packing import PackedWeight
from ..scheme import QuantScheme
from ..transforms import fold
from ..transforms.layout import block_layout
from ..transforms.weights import linear_weight, module_weight
from .autoround import _samples
from .base import ALGORITHMS, Algorithm, QuantResult
from .gptq import gptq_quantize
from .hessian import block_hessians, replay_kwargs
from .samples import SampleIndex

log = logging.getLogger(__name__)

QUANTIZERS = ("rtn", "gptq", "autoround", "recon")


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ------------------------------------------------------------------------------------------ capture
class _Site:
    """One scaling site: the Linears scaled by s on their inputs, the module inspected, what feeds it."""

    def __init__(self, kind: str, source: str, scaled: list[str], inspect: str, heads=None):
        self.kind, self.source, self.scaled, self.inspect, self.heads = kind, source, scaled, inspect, heads
        self.calls: list[tuple[tuple, dict, Tensor]] = []  # (args, kwargs, fp output) of the inspected module
        self.abs_sum: Tensor | None = None  # [in] sum |x| over tokens of the scaled Linears' input
        self.tokens = 0.0


def _sites(block: nn.Module) -> list[_Site]:
    lay = block_layout(block)
    attn = lay.attn_readers[0].split(".")[0] if lay.attn_readers else None
    mlp = lay.mlp_readers[0].split(".")[0] if lay.mlp_readers else None
    sites = []
    if attn:
        sites.append(_Site("norm", lay.attn_norm, lay.attn_readers, attn))
    for h in lay.heads:
        sites.append(_Site("heads", h.v, [h.o], h.o, heads=h))
    if mlp:
        sites.append(_Site("norm", lay.mlp_norm, lay.mlp_readers, mlp))
    for up, down in lay.up_down:
        sites.append(_Site("linear", up, [down], down))
    return sites


@torch.no_grad()
def _capture(block: nn.Module, sites: list[_Site], inputs: list[Tensor], kwargs: list[dict]) -> None:
    """Record each inspected module's calls (inputs, kwargs, fp outputs) and |x| sums of its scaled inputs."""
    handles = []
    for site in sites:
        mod = block.get_submodule(site.inspect)

        def hook(m, args, kw, out, site=site):
            site.calls.append((tuple(a.detach() if isinstance(a, Tensor) else a for a in args), dict(kw),
                               _block_out(out).detach()))

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
        first = block.get_submodule(site.scaled[0])

        def stat(m, args, site=site):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # [tokens, in]
            s = x.abs().sum(0)
            site.abs_sum = s if site.abs_sum is None else site.abs_sum + s
            site.tokens += x.shape[0]

        handles.append(first.register_forward_pre_hook(stat))
    dev = next(block.parameters()).device
    try:
        for x, kw in zip(inputs, kwargs):
            block(x.to(dev, torch.float32), **replay_kwargs(kw))
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------ search
def _rtn_fake(w: Tensor, scheme: QuantScheme) -> Tensor:
    scale, zero = P.minmax_qparams(w, scheme)
    return P.fake_quantize(w, scale, zero, scheme)


def _site_loss(block: nn.Module, site: _Site, weights: dict[str, Tensor]) -> tuple[float, float]:
    """(sum of squared errors, element count) of the inspected module with `weights` (relative names)."""
    mod = block.get_submodule(site.inspect)
    sse, n = 0.0, 0.0
    for args, kw, y in site.calls:
        out = _block_out(functional_call(mod, weights, args, kw))
        sse += float((out - y).pow(2).sum())
        n += y.numel()
    return sse, n


def _stat_scales(site: _Site, alpha: float) -> Tensor:
    """s [in of the scaled Linears] = mean|x|^alpha normalised to geometric mean 1 (per v channel for heads)."""
    mean = (site.abs_sum / max(site.tokens, 1.0)).clamp(min=1e-8)
    if site.heads is not None:  # o_proj's channels per attention head -> per value channel
        h = site.heads
        mean = mean.view(h.n_kv, h.n_heads // h.n_kv, h.head_dim).mean(1).flatten()
    s = mean.pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return s.clamp(min=1e-4)


def _expand(site: _Site, s: Tensor) -> Tensor:
    """Scale of the scaled Linears' input channels from the per-source-channel scale."""
    if site.heads is None:
        return s
    h = site.heads
    return s.view(h.n_kv, 1, h.head_dim).expand(h.n_kv, h.n_heads // h.n_kv, h.head_dim).flatten()


@torch.no_grad()
def search_scales(block: nn.Module, site: _Site, plan: dict[str, QuantScheme], grid: int = 20) -> tuple[Tensor, float]:
    """Best per-channel scale of one site (alpha on the grid) and its alpha."""
    prefix = site.inspect + "."
    rel = {n: n[len(prefix):] if n.startswith(prefix) else "weight" for n in site.scaled}
    originals = {n: linear_weight(block.get_submodule(n)).detach().float() for n in site.scaled}
    best = (None, float("inf"), 0.0)
    for k in range(grid):
        alpha = k / grid
        s = _stat_scales(site, alpha)
        si = _expand(site, s)
        weights = {}
        for n, w in originals.items():
            w_eff = w if n not in plan else _rtn_fake(w * si[None, :], plan[n]) / si[None, :]
            key = f"{rel[n]}.weight" if rel[n] != "weight" else "weight"
            weights[key] = module_weight(block.get_submodule(n), w_eff)
        sse, n = _site_loss(block, site, weights)
        loss = all_reduce_scalar(sse) / max(all_reduce_scalar(n), 1.0)
        if loss < best[1]:
            best = (s, loss, alpha)
    return best[0], best[2]


@torch.no_grad()
def apply_scales_(block: nn.Module, site: _Site, s: Tensor) -> None:
    """Fold s: the source's outputs divided by s, the scaled Linears' inputs multiplied by it."""
    src = block.get_submodule(site.source)
    if site.kind == "norm":
        fold.scale_norm_(src, 1.0 / s)
    else:
        fold.scale_outputs_(src, 1.0 / s)
    for n in site.scaled:
        fold.scale_inputs_(block.get_submodule(n), _expand(site, s))


def awq_transform_(block: nn.Module, plan: dict[str, QuantScheme], inputs: list[Tensor], kwargs: list[dict], *,
                   grid: int = 20, samples: int = 4) -> dict[str, float]:
    """Search and fold AWQ scales into `block` in place, site by site, on the first `samples` calibration
    samples (by global index: torchrun ranks search on the same ones; statistics and losses are summed).
    Returns {site source: alpha}."""
    single = _samples(inputs, kwargs, inputs)  # [(x [1, T, H], kwargs, _)]
    chosen = [single[i] for i in SampleIndex(len(single)).first(samples)]
    sub_x = [c[0] for c in chosen]
    sub_kw = [c[1] for c in chosen]
    dev = next(block.parameters()).device
    alphas = {}
    for site in _sites(block):
        if not any(n in plan for n in site.scaled):
            continue
        _capture(block, [site], sub_x, sub_kw)  # after the previous sites' folds: their effect is included
        if site.abs_sum is None:
            site.abs_sum = torch.zeros(linear_weight(block.get_submodule(site.scaled[0])).shape[1], device=dev)
        all_reduce_sum_(site.abs_sum)
        site.tokens = all_reduce_scalar(site.tokens)
        if site.tokens == 0:  # an expert nobody routed to: nothing to weigh its channels by
            continue
        s, alpha = search_scales(block, site, plan, grid)
        if alpha > 0:
            apply_scales_(block, site, s)
        alphas[site.source] = alpha
        site.calls = []
    return alphas


# ------------------------------------------------------------------------------------------ clipping
@torch.no_grad()
def clip_quantize(w: Tensor, H: Tensor, scheme: QuantScheme, *, grid: int = 20, min_ratio: float = 0.5) -> QuantResult:
    """Round to nearest with, per group, the range shrink that minimises the group's output error
    d_g H_gg d_g^T (d = w - w_hat over the group's columns, H_gg the group's block of the Hessian)."""
    w = w.detach().float()
    out_f, in_f = w.shape
    G = scheme.group_for(in_f)
    ng = scheme.n_groups(in_f)
    Hp = torch.zeros(ng * G, ng * G, device=w.device)
    Hp[:in_f, :in_f] = H
    Hg = torch.stack([Hp[g * G:(g + 1) * G, g * G:(g + 1) * G] for g in range(ng)])  # [ng, G, G]
    best_err = best_scale = best_zero = None
    for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
        scale, zero = P.minmax_qparams(w, scheme, clip=ratio)  # [out, ng]
        d = P.group_view(w - P.fake_quantize(w, scale, zero, scheme), G)  # [out, ng, G]
        err = torch.einsum("ogi,gij,ogj->og", d, Hg, d)  # [out, ng]
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    q = P.quantize(w, best_scale, best_zero, scheme)
    w_hat = P.dequantize(q, best_scale, best_zero, G)
    E = w - w_hat
    return QuantResult(PackedWeight.from_codes(q, best_scale, best_zero, scheme), P.relative_error(w, w_hat),
                       {"loss": float((E @ H * E).sum())})


# ------------------------------------------------------------------------------------------ algorithm
def awq_block(block: nn.Module, plan: dict[str, QuantScheme], inputs: list[Tensor], kwargs: list[dict],
              targets: list[Tensor], *, quantizer: str = "rtn", grid: int = 20, samples: int = 4, clip: bool = True,
              damp: float = 0.01, block_size: int = 128, inner: Algorithm | None = None) -> dict[str, QuantResult]:
    """AWQ on one block: scales folded in place, then `quantizer` on the scaled weights (module doc)."""
    if quantizer not in QUANTIZERS:
        raise ValueError(f"awq: quantizer={quantizer!r}; choose one of {', '.join(QUANTIZERS)}")
    t0 = time.perf_counter()
    alphas = awq_transform_(block, plan, inputs, kwargs, grid=grid, samples=samples)
    t_search = time.perf_counter() - t0
    if quantizer in ("autoround", "recon"):
        if inner is None:
            inner = ALGORITHMS.get(quantizer)()
        results = inner.quantize_block(block, plan, inputs, kwargs, targets)
    else:
        H = block_hessians(block, list(plan), inputs, kwargs)
        results = {}
        for n, s in plan.items():
            w = linear_weight(block.get_submodule(n))
            if quantizer == "gptq":
                results[n] = gptq_quantize(w, H[n], s, block=block_size, damp=damp)
            elif clip:
                results[n] = clip_quantize(w, H[n], s)
            else:
                from .rtn import rtn_quantize

                results[n] = rtn_quantize(w, s)
    for r in results.values():
        r.stats = {**r.stats, "awq_alpha": alphas, "awq_search_s": t_search}
    log.info("awq block: alphas %s (search %.1fs), %s in %.1fs", {k.split(".")[-1]: v for k, v in alphas.items()},
             t_search, quantizer, time.perf_counter() - t0)
    return results


@ALGORITHMS.register("awq")
class AWQ(Algorithm):
    """Settings: quantizer (rtn | gptq | autoround | recon; default rtn), awq_grid (20 alphas), awq_samples
    (4 calibration samples for the search), clip (True: rtn's per-group clipping search); gptq's damp /
    block_size; the block quantizers read their own settings (iters, lr, ...)."""

    name = "awq"
    needs_calibration = True
    granularity = "block"

    def quantize_block(self, block: nn.Module, plan: dict[str, QuantScheme], inputs: list[Tensor],
                       kwargs: list[dict], targets: list[Tensor]) -> dict[str, QuantResult]:
        s = self.settings
        quantizer = str(s.get("quantizer") or "rtn")
        inner = ALGORITHMS.get(quantizer)(**s) if quantizer in ("autoround", "recon") else None
        return awq_block(block, plan, inputs, kwargs, targets, quantizer=quantizer,
                         grid=int(s.get("awq_grid") or 20), samples=int(s.get("awq_samples") or 4),
                         clip=bool(s.get("clip", True)), damp=float(s.get("damp", 0.01)),
                         block_size=int(s.get("block_size") or 128), inner=inner)
