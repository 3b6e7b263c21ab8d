"""Mixed precision to a bit budget: choose each Linear's scheme so that the checkpoint averages at most
B bits per quantized weight (codes, scales, zero points: everything the format writes for the layer
except its bias) at the lowest predicted loss.

1. Cost in bits of each candidate scheme for each layer: counted from the very tensors the chosen
   format writes (`layer_bits`), so the budget holds for the written checkpoint exactly.
2. Sensitivity, measured: the model's calibration loss L is differentiated on calibration samples and
   each weight's empirical Fisher information F = mean over samples of (dL_s/dw)^2 is accumulated; the
   predicted loss increase of quantizing layer l with scheme k is 1/2 sum_i F_i (w_i - q_k(w_i))^2, with
   q_k round-to-nearest at that scheme (the second-order estimate of the model-loss increase; it ranks
   layers and schemes, the chosen algorithm then quantizes them).
3. Allocation: a multiple-choice knapsack solved by Lagrangian relaxation (each layer takes the scheme
   minimising cost + lambda * bits; lambda bisected to the budget) and a greedy fill of the bits left
   (best predicted gain per bit first) that never crosses the budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import primitives as P
from .formats import FORMATS
from .packing import PackedWeight, packed_size
from .scheme import QuantScheme
from .transforms.weights import is_transposed, linear_weight

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("W2G64", "W2G128", "W3G64", "W3G128", "W4G64", "W4G128", "W8G128")
DEFAULT_FORMAT = "compressed-tensors"


def layer_bits(scheme: QuantScheme | str, out_features: int, in_features: int, fmt: str = DEFAULT_FORMAT) -> int:
    """Bits `fmt` writes for one quantized [out, in] layer at `scheme` (every tensor but the bias)."""
    return _layer_bits(str(QuantScheme.parse(scheme)), out_features, in_features, fmt)


_BITS_CACHE: dict[tuple, int] = {}


def _layer_bits(scheme: str, out_f: int, in_f: int, fmt: str) -> int:
    key = (scheme, out_f, in_f, fmt)
    if key not in _BITS_CACHE:
        s = QuantScheme.parse(scheme)
        ng = s.n_groups(in_f)
        pw = PackedWeight(qweight=torch.zeros(packed_size(in_f, s.bits), out_f, dtype=torch.int32),
                          scales=torch.ones(ng, out_f, dtype=torch.float16),
                          zeros=torch.full((ng, out_f), 2 ** (s.bits - 1), dtype=torch.uint8), scheme=s,
                          in_features=in_f, out_features=out_f)
        tensors = FORMATS.get(fmt)().layer_tensors(pw, {})
        _BITS_CACHE[key] = sum(t.numel() * t.element_size() * 8 for k, t in tensors.items() if k != "bias")
    return _BITS_CACHE[key]


# ------------------------------------------------------------------------------------------ sensitivity
def fisher_diagonal(model: nn.Module, names: list[str], samples: Tensor) -> dict[str, Tensor]:
    """{name: F [out, in] fp32}: mean over samples of the squared gradient of each sample's mean token loss.

    samples: [n, L] token ids. Only the named Linears' weights get gradients; each squared gradient is
    added to F as soon as it is computed and the gradient freed (memory: one fp32 copy of those weights).
    """
    mods = {n: model.get_submodule(n) for n in names}
    fisher = {n: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device) for n, m in mods.items()}
    saved = {p: p.requires_grad for p in model.parameters()}
    hooks = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for n, m in mods.items():
            m.weight.requires_grad_(True)

            def acc(p, n=n):
                fisher[n].add_(p.grad.float().pow(2))
                p.grad = None

            hooks.append(m.weight.register_post_accumulate_grad_hook(acc))
        dev = next(model.parameters()).device
        was_training = model.training
        model.eval()
        for ids in samples:
            ids = ids[None].to(dev)
            out = model(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
        for p, r in saved.items():
            p.requires_grad_(r)
            p.grad = None
    n = max(samples.shape[0], 1)
    return {name: (f.div_(n).t() if is_transposed(mods[name]) else f.div_(n)) for name, f in fisher.items()}  # [out, in]


@torch.no_grad()
def predicted_costs(weights: dict[str, Tensor], fisher: dict[str, Tensor],
                    candidates: list[QuantScheme]) -> dict[str, dict[str, float]]:
    """{name: {scheme: 1/2 sum F (w - rtn_k(w))^2}}; weights [out, in]."""
    costs = {}
    for name, w in weights.items():
        w = w.float()
        F = fisher[name].to(w.device)
        costs[name] = {}
        for s in candidates:
            scale, zero = P.minmax_qparams(w, s)
            d = w - P.fake_quantize(w, scale, zero, s)
            costs[name][str(s)] = 0.5 * float((F * d * d).sum())
    return costs


# ------------------------------------------------------------------------------------------ allocation
@dataclass
class Allocation:
    budget: float  # bits per quantized weight asked for
    bits: float  # achieved (<= budget)
    fmt: str  # the format whose tensors were counted
    schemes: dict[str, str]  # layer -> scheme
    layer_bits: dict[str, int]  # layer -> bits written
    costs: dict[str, dict[str, float]]  # layer -> scheme -> predicted loss increase
    weights: int  # quantized weights (sum out * in)
    candidates: list[str] = field(default_factory=list)
    fisher_samples: int = 0
    numel: dict[str, int] = field(default_factory=dict)  # layer -> out * in

    @property
    def predicted(self) -> float:
        return sum(self.costs[n][s] for n, s in self.schemes.items())

    def to_dict(self) -> dict:
        return {"budget": self.budget, "bits": self.bits, "format": self.fmt, "candidates": self.candidates,
                "fisher_samples": self.fisher_samples, "weights": self.weights, "predicted_loss_increase": self.predicted,
                "layers": {n: {"scheme": s, "bits": self.layer_bits[n], "numel": self.numel[n], "cost": self.costs[n]}
                           for n, s in self.schemes.items()}}

    def main_scheme(self) -> str:
        """The scheme holding the most weights (the checkpoint's headline scheme)."""
        share: dict[str, int] = {}
        for n, s in self.schemes.items():
            share[s] = share.get(s, 0) + self.numel[n]
        return max(share, key=share.get)

    def table(self) -> str:
        return budget_table(self.to_dict())


def budget_table(d: dict) -> str:
    """The summary of an Allocation.to_dict() (as wq.json holds it): per scheme, layers / weights / share."""
    rows: dict[str, list[int]] = {}
    for layer in d["layers"].values():
        r = rows.setdefault(layer["scheme"], [0, 0, 0])
        r[0] += 1
        r[1] += layer["numel"]
        r[2] += layer["bits"]
    lines = [f"mixed precision, budget {d['budget']:g} bits/weight ({d['format']} tensors counted): "
             f"{d['bits']:.4f} written",
             f"  {'scheme':<10} {'layers':>6} {'weights':>13} {'share':>7} {'bits/weight':>11}"]
    for s, (k, numel, bits) in sorted(rows.items(), key=lambda kv: QuantScheme.parse(kv[0]).bits_per_weight()):
        lines.append(f"  {s:<10} {k:>6} {numel:>13,} {numel / d['weights']:>7.1%} {bits / numel:>11.4f}")
    return "\n".join(lines)


def allocate(costs: dict[str, dict[str, float]], bits: dict[str, dict[str, int]], numel: dict[str, int],
             budget: float) -> dict[str, str]:
    """Multiple-choice knapsack: one scheme per layer, sum(bits) <= budget * sum(numel), least sum(cost)."""
    total = sum(numel.values())
    cap = math.floor(budget * total)
    cheapest = {n: min(bits[n], key=lambda s: (bits[n][s], costs[n][s])) for n in costs}
    if sum(bits[n][cheapest[n]] for n in costs) > cap:
        least = sum(bits[n][cheapest[n]] for n in costs) / total
        raise ValueError(f"--bits-budget {budget:g} is below the smallest candidate mix ({least:.4f} bits/weight); "
                         "raise it or add cheaper --bits-candidates")

    def pick(lam: float) -> dict[str, str]:
        return {n: min(c, key=lambda s: (c[s] + lam * bits[n][s], bits[n][s])) for n, c in costs.items()}

    def used(choice: dict[str, str]) -> int:
        return sum(bits[n][s] for n, s in choice.items())

    lo, hi = 0.0, 1.0
    while used(pick(hi)) > cap:  # a price per bit high enough to fit
        hi *= 2.0
        if hi > 1e30:
            break
    for _ in range(100):
        mid = (lo + hi) / 2
        if used(pick(mid)) > cap:
            lo = mid
        else:
            hi = mid
    choice = pick(hi)
    # greedy fill: the best predicted gain per extra bit, while it fits
    left = cap - used(choice)
    while True:
        best = None
        for n, s in choice.items():
            for t, b in bits[n].items():
                extra = b - bits[n][s]
                gain = costs[n][s] - costs[n][t]
                if 0 < extra <= left and gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, n, t, extra)
        if best is None:
            break
        _, n, t, extra = best
        choice[n] = t
        left -= extra
    return choice


def choose_schemes(model: nn.Module, names: list[str], samples: Tensor, budget: float, *,
                   candidates: list[str] | tuple[str, ...] = DEFAULT_CANDIDATES, fmt: str = DEFAULT_FORMAT
                   ) -> Allocation:
    """Measure sensitivities on `samples` ([n, L] token ids) and allocate schemes to `names` within `budget`."""
    cands = [QuantScheme.parse(c) for c in candidates]
    for c in cands:
        if not c.is_int:
            raise ValueError(f"--bits-candidates: {c} is not an integer scheme")
        why = FORMATS.get(fmt)().why_not(c)
        if why:
            raise ValueError(f"--bits-candidates {c}: format {fmt} cannot store it: {why}")
    weights = {n: linear_weight(model.get_submodule(n)).detach() for n in names}
    log.info("bits budget %.4g: measuring sensitivities of %d layers on %d samples", budget, len(names),
             samples.shape[0])
    fisher = fisher_diagonal(model, names, samples)
    costs = predicted_costs(weights, fisher, cands)
    del fisher
    numel = {n: w.numel() for n, w in weights.items()}
    bits = {n: {str(c): layer_bits(c, *weights[n].shape, fmt) for c in cands} for n in names}
    choice = allocate(costs, bits, numel, budget)
    lb = {n: bits[n][s] for n, s in choice.items()}
    total = sum(numel.values())
    alloc = Allocation(budget=budget, bits=sum(lb.values()) / total, fmt=fmt, schemes=choice, layer_bits=lb,
                       costs=costs, weights=total, candidates=[str(c) for c in cands],
                       fisher_samples=int(samples.shape[0]), numel=numel)
    log.info("%s", alloc.table())
    return alloc


def budget_overrides(model: nn.Module, scheme: QuantScheme | str, budget: float, *, skip, override, calib, tokenizer,
                     candidates=None, fmt: str | None = None, samples: int = 16, **settings
                     ) -> tuple[dict[str, QuantScheme], Allocation]:
    """For wq.quantize_model: the per-layer overrides that meet `budget` (exact-name patterns, after the
    user's own overrides, whose layers keep their scheme and count towards the budget) and the Allocation."""
    import re

    from .calib.data import calibration_samples
    from .nn import parse_overrides, plan_layers

    fmt = fmt or DEFAULT_FORMAT
    user = parse_overrides(override)
    plan, _ = plan_layers(model, scheme, skip=skip, override=user)
    fixed = {n: s for n, s in plan.items() if any(re.search(p, n) for p in user)}
    free = [n for n in plan if n not in fixed]
    if not free:
        raise ValueError("--bits-budget: every quantized layer has an --override; nothing left to choose")
    if tokenizer is None and not isinstance(calib, Tensor):
        raise ValueError("--bits-budget measures sensitivities on calibration text: give a tokenizer (the CLI does)")
    n = min(int(settings.get("nsamples") or 128), samples)
    ids = calibration_samples(calib, tokenizer, nsamples=n, seqlen=int(settings.get("seqlen") or 2048),
                              seed=int(settings.get("seed") or 0))
    shape = {n_: tuple(linear_weight(model.get_submodule(n_)).shape) for n_ in plan}
    total = sum(o * i for o, i in shape.values())
    fixed_bits = sum(layer_bits(s, *shape[n_], fmt) for n_, s in fixed.items())
    free_numel = sum(shape[n_][0] * shape[n_][1] for n_ in free)
    free_budget = (budget * total - fixed_bits) / free_numel
    dtype = next(model.parameters()).dtype
    cast = next(model.parameters()).device.type == "cpu" and dtype != torch.float32
    if cast:  # CPU backward in bf16 is slow and coarse; fp32 values of bf16 weights are exact, so cast back losslessly
        model.float()
    try:
        alloc = choose_schemes(model, free, ids, free_budget, candidates=candidates or DEFAULT_CANDIDATES, fmt=fmt)
    finally:
        if cast:
            model.to(dtype)
    for n_, s in fixed.items():  # the user's layers, in the record and the count
        alloc.schemes[n_] = str(s)
        alloc.layer_bits[n_] = layer_bits(s, *shape[n_], fmt)
        alloc.numel[n_] = shape[n_][0] * shape[n_][1]
        alloc.costs[n_] = {str(s): 0.0}
    alloc.budget, alloc.weights = budget, total
    alloc.bits = sum(alloc.layer_bits.values()) / total
    exact = {f"^{re.escape(n_)}$": QuantScheme.parse(s) for n_, s in alloc.schemes.items() if n_ not in fixed}
    return {**user, **exact}, alloc
