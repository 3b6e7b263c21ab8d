"""What a BF16 -> FP16 (or FP8) conversion does to a model: per-layer weight and activation audit.

FP16 facts (IEEE binary16, round to nearest even):
    max 65504; |x| >= 65520 rounds to inf (65504 < |x| < 65520 rounds down to 65504)
    smallest normal 2^-14 (6.1e-5); subnormals step by 2^-24 (5.96e-8)
    2^-25 < |x| < 2^-24 rounds *up* to 2^-24 (relative error up to 100%)
    |x| <= 2^-25 rounds to 0 (exactly 2^-25 is a tie, and ties go to the even neighbour, 0)
BF16 has 8 exponent bits, so every one of these cases can occur in a BF16 checkpoint.

Weights: `cast_stats` counts, per tensor, values that overflow to inf (or clip at the format max for
FP8), land in the subnormal range, are raised to the smallest subnormal, or flush to zero, plus the
elementwise relative error of the cast. Activations: `activation_amax` runs a short calibration pass
of the unconverted model with hooks on every Linear's input and output, every norm's input (the
residual stream) and every decoder block's output, and compares the largest magnitude with 65504.
All functions are pure apart from the hooks; the CLI glue lives in wq/cast.py.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

FP16_MAX = 65504.0
FP16_INF_FROM = 65520.0  # halfway between 65504 and the next (absent) step 65536: rounds to inf
FP16_MIN_NORMAL = 2.0**-14
FP16_MIN_SUBNORMAL = 2.0**-24
FP16_FLUSH_AT = 2.0**-25  # |x| <= this becomes 0


@dataclass
class CastStats:
    """What casting one tensor does. Counts are of elements; errors are |cast - w| / |w| over w != 0."""

    numel: int
    overflow: int = 0  # became +-inf (FP16, FP8 E5M2 without clamping)
    clipped: int = 0  # |w/scale| at or beyond max + half a step, clamped to the max (FP8)
    subnormal: int = 0  # nonzero result below the format's smallest normal
    min_subnormal: int = 0  # of those: rounded *up* to the smallest subnormal (2^-25 < |x| < 2^-24 in FP16)
    flushed: int = 0  # nonzero input that became 0
    rel_err_max: float = 0.0  # over finite results
    rel_err_mean: float = 0.0
    rel_err_fro: float = 0.0  # ||cast - w||_F / ||w||_F over finite results
    seconds: float = 0.0  # time of the cast itself

    def add(self, other: CastStats) -> CastStats:
        """Totals over layers: counts add, max of maxes, means weighted by numel."""
        n = self.numel + other.numel
        mean = (self.rel_err_mean * self.numel + other.rel_err_mean * other.numel) / max(n, 1)
        fro = math.sqrt((self.rel_err_fro**2 * self.numel + other.rel_err_fro**2 * other.numel) / max(n, 1))
        return CastStats(
            numel=n, overflow=self.overflow + other.overflow, clipped=self.clipped + other.clipped,
            subnormal=self.subnormal + other.subnormal, min_subnormal=self.min_subnormal + other.min_subnormal,
            flushed=self.flushed + other.flushed, rel_err_max=max(self.rel_err_max, other.rel_err_max),
            rel_err_mean=mean, rel_err_fro=fro, seconds=self.seconds + other.seconds,
        )


def _finfo(dtype: torch.dtype) -> tuple[float, float, float]:
    """(max, smallest normal, smallest subnormal) of a float dtype."""
    fi = torch.finfo(dtype)
    min_sub = fi.smallest_normal * fi.eps  # 2^-(bias-1) * 2^-mantissa_bits
    return float(fi.max), float(fi.smallest_normal), float(min_sub)


def _round_limit(dtype: torch.dtype) -> float:
    """Smallest magnitude that does not round to the format max: max + half a step (65520 for FP16,
    464 for E4M3, 61440 for E5M2). Values between max and this are rounding, not clipping."""
    fi = torch.finfo(dtype)
    return float(fi.max) + 2.0 ** math.floor(math.log2(fi.max)) * float(fi.eps) / 2


@torch.no_grad()
def cast_stats(w: Tensor, dtype: torch.dtype = torch.float16, *, scale: Tensor | None = None,
               group: int | None = None) -> CastStats:
    """Cast w to `dtype` (optionally divided by a per-group `scale` [out, n_groups] first, as FP8 does).

    Without a scale (FP16) out-of-range values overflow to inf as a plain `.to` does; with a scale
    (FP8) they are clamped to the format max and counted as `clipped`.
    """
    x = w.detach().float()
    if scale is not None:
        g = group or x.shape[1] // scale.shape[1]
        s = scale.float().repeat_interleave(g, dim=1)  # [out, in]
        x = x / s
    fmax, fmin_normal, fmin_sub = _finfo(dtype)
    t = time.perf_counter()
    if scale is None:
        c = x.to(dtype)
    else:
        c = x.clamp(-fmax, fmax).to(dtype)
    seconds = time.perf_counter() - t
    cf = c.float()
    nz = x != 0
    finite = torch.isfinite(cf)
    abs_c = cf.abs()
    stats = CastStats(
        numel=x.numel(),
        overflow=int((~finite & torch.isfinite(x)).sum()),
        clipped=int((x.abs() >= _round_limit(dtype)).sum()) if scale is not None else 0,
        subnormal=int((nz & (abs_c > 0) & (abs_c < fmin_normal)).sum()),
        min_subnormal=int((nz & (x.abs() < fmin_sub) & (abs_c == fmin_sub)).sum()),
        flushed=int((nz & (cf == 0)).sum()),
        seconds=seconds,
    )
    ok = nz & finite
    if ok.any():
        diff = (cf - x)[ok]
        ref = x[ok]
        rel = diff.abs() / ref.abs()  # the scale cancels: relative error of w and of w/scale are equal
        stats.rel_err_max = float(rel.max())
        stats.rel_err_mean = float(rel.mean())
        stats.rel_err_fro = float(diff.norm() / ref.norm())
    return stats


def audit_weights(model: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, CastStats]:
    """cast_stats of every parameter (tied ones once), keyed by parameter name."""
    out: dict[str, CastStats] = {}
    for name, p in model.named_parameters():  # named_parameters dedups tied weights
        if p.is_floating_point():
            out[name] = cast_stats(p, dtype)
    return out


def audit_fp8_weights(model: nn.Module, scheme) -> dict[str, CastStats]:
    """cast_stats of each Linear weight under an FP8 scheme (scale = amax / format max), by module name.

    Linears whose in_features the group does not divide are left out (quantize_model would refuse them).
    """
    from .fp8 import FP8_DTYPES, fp8_scales
    from .scheme import QuantScheme

    scheme = QuantScheme.parse(scheme)
    out: dict[str, CastStats] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not (scheme.group_size > 0 and m.in_features % scheme.group_size):
            scale = fp8_scales(m.weight, scheme)
            out[name] = cast_stats(m.weight, FP8_DTYPES[scheme.fmt], scale=scale,
                                   group=scheme.group_for(m.in_features))
    return out


def total(stats: dict[str, CastStats]) -> CastStats:
    acc = CastStats(numel=0)
    for s in stats.values():
        acc = acc.add(s)
    return acc


# ------------------------------------------------------------------------------------ activations


@dataclass
class ActStat:
    name: str  # module name (+ ":in" / ":out")
    kind: str  # "linear.in", "linear.out", "residual" (a norm's input), "block.out"
    amax: float  # largest |x| seen, computed in fp32

    @property
    def overflows(self) -> bool:
        return self.amax >= FP16_INF_FROM

    @property
    def headroom(self) -> float:
        """FP16_MAX / amax: below 1 the value does not fit in FP16."""
        return FP16_MAX / self.amax if self.amax > 0 else math.inf


def _first_tensor(x) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)):
        return next((t for t in x if isinstance(t, Tensor)), None)
    return getattr(x, "last_hidden_state", None)


def _blocks(model: nn.Module) -> set[str]:
    """Names of the decoder blocks: the children of the longest ModuleList."""
    best_name, best = "", None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and (best is None or len(m) > len(best)):
            best_name, best = name, m
    return {f"{best_name}.{i}" for i in range(len(best))} if best is not None else set()


@torch.no_grad()
def activation_amax(model: nn.Module, batches: list[Tensor] | Tensor) -> list[ActStat]:
    """Largest |activation| at every Linear input/output, norm input and decoder-block output.

    batches: token ids, a list of [b, seqlen] tensors (or one [n, seqlen] tensor, run a row at a time).
    The model runs as it is (callers pass the BF16 model upcast to fp32 on CPU: same weights, no overflow
    in the measurement itself). Returns ActStats in module order.
    """
    if isinstance(batches, Tensor):
        batches = list(batches.split(1))
    amax: dict[tuple[str, str], float] = {}
    blocks = _blocks(model)

    def record(key, t):
        t = _first_tensor(t)
        if t is not None and t.is_floating_point() and t.numel():
            amax[key] = max(amax.get(key, 0.0), float(t.detach().abs().amax()))

    def hook(name: str, kind: str):
        def fn(mod, inputs, output) -> None:  # a forward hook must return None (else it replaces the output)
            if kind == "linear":
                record((name + ":in", "linear.in"), inputs)
                record((name + ":out", "linear.out"), output)
            elif kind == "residual":
                record((name + ":in", "residual"), inputs)
            else:
                record((name + ":out", "block.out"), output)
        return fn

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            kind = "linear"
        elif "norm" in type(m).__name__.lower():
            kind = "residual"
        elif name in blocks:
            kind = "block"
        else:
            continue
        handles.append(m.register_forward_hook(hook(name, kind)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [ActStat(name=n, kind=k, amax=v) for (n, k), v in amax.items()]


def fix_for(a: ActStat) -> str:
    """What to do about an activation that does not fit in FP16."""
    k = max(1, math.ceil(math.log2(a.amax / FP16_MAX)) + 1)
    module = a.name.rsplit(":", 1)[0]
    if a.kind == "linear.out":
        return (f"keep {module} in BF16/FP32, or scale its weight by 2^-{k} and multiply its consumer by 2^{k}")
    if a.kind == "linear.in":
        return f"the op feeding {module} overflows: keep it (and {module}) in BF16/FP32, or scale by 2^-{k}"
    return (f"the residual stream at {module} reaches {a.amax:.0f}: FP16 cannot hold it without rescaling "
            f"every block by 2^-{k}; keep the model in BF16, or use FP8 weights with BF16 activations")


# ------------------------------------------------------------------------------------ the report


@dataclass
class Fp16Audit:
    """The audit of one conversion: weights per tensor, activations per hook point, totals, time."""

    weights: dict[str, CastStats]
    activations: list[ActStat] = field(default_factory=list)
    convert_seconds: float = 0.0  # wall time of converting the whole model (model.to(float16))
    calib: dict = field(default_factory=dict)  # what the activation pass ran on
    fp8: dict[str, dict[str, CastStats]] = field(default_factory=dict)  # scheme -> layer -> stats

    @property
    def weight_total(self) -> CastStats:
        return total(self.weights)

    @property
    def weight_overflows(self) -> list[str]:
        return [n for n, s in self.weights.items() if s.overflow]

    @property
    def act_overflows(self) -> list[ActStat]:
        return [a for a in self.activations if a.overflows]

    @property
    def max_activation(self) -> ActStat | None:
        return max(self.activations, key=lambda a: a.amax, default=None)

    @property
    def ok(self) -> bool:
        """True when an FP16 checkpoint of this model would hold no inf (weights and measured activations)."""
        return not self.weight_overflows and not self.act_overflows

    def problems(self) -> list[str]:
        out = [f"weight {n}: {self.weights[n].overflow} value(s) >= {FP16_INF_FROM:.0f} become inf; keep it in "
               f"BF16/FP32 or scale it" for n in self.weight_overflows]
        out += [f"activation {a.name}: max |x| = {a.amax:.1f} >= {FP16_INF_FROM:.0f} -> inf; {fix_for(a)}"
                for a in self.act_overflows]
        return out

    def to_dict(self) -> dict:
        mx = self.max_activation
        return {
            "fp16": {"max": FP16_MAX, "inf_from": FP16_INF_FROM, "min_normal": FP16_MIN_NORMAL,
                     "min_subnormal": FP16_MIN_SUBNORMAL, "flush_at_or_below": FP16_FLUSH_AT},
            "ok": self.ok,
            "convert_seconds": round(self.convert_seconds, 4),
            "weights_total": asdict(self.weight_total),
            "weights": {n: asdict(s) for n, s in self.weights.items()},
            "activations": [{**asdict(a), "overflows": a.overflows, "headroom": a.headroom}
                            for a in self.activations],
            "max_activation": None if mx is None else {"name": mx.name, "amax": mx.amax, "headroom": mx.headroom},
            "problems": self.problems(),
            "calib": self.calib,
            "fp8": {s: {"total": asdict(total(layers)), "layers": {n: asdict(v) for n, v in layers.items()}}
                    for s, layers in self.fp8.items()},
        }

    def save(self, path) -> None:
        from pathlib import Path

        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str))

    def table(self, top: int = 10) -> str:
        """Markdown tables: weights (problem rows, then the total), activations (the largest `top`)."""
        lines = ["| weight | numel | -> inf | subnormal | -> 2^-24 | -> 0 | rel err max | rel err mean |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]

        def row(n, s: CastStats):
            return (f"| {n} | {s.numel} | {s.overflow} | {s.subnormal} | {s.min_subnormal} | {s.flushed} | "
                    f"{s.rel_err_max:.3g} | {s.rel_err_mean:.3g} |")

        flagged = [n for n, s in self.weights.items() if s.overflow or s.flushed or s.subnormal]
        worst = [n for n in sorted(self.weights, key=lambda n: -self.weights[n].rel_err_mean)[:3]
                 if self.weights[n].rel_err_mean > 0]
        for n in list(dict.fromkeys(flagged[:top] + worst)):
            lines.append(row(n, self.weights[n]))
        if len(flagged) > top:
            lines.append(f"| ... {len(flagged) - top} more tensors with subnormal/flushed values | | | | | | | |")
        lines.append(row(f"**all {len(self.weights)} tensors**", self.weight_total))
        lines.append(f"\nconversion (model.to(float16)): {self.convert_seconds:.3f} s; "
                     f"casts alone: {self.weight_total.seconds:.3f} s")
        if self.activations:
            lines += ["", "| activation | kind | max abs | vs 65504 | fits FP16 |", "|---|---|---:|---:|---|"]
            for a in sorted(self.activations, key=lambda a: -a.amax)[:top]:
                lines.append(f"| {a.name} | {a.kind} | {a.amax:.1f} | {a.amax / FP16_MAX:.3%} | "
                             f"{'NO (inf)' if a.overflows else 'yes'} |")
            if self.calib:
                lines.append(f"\nactivations from {self.calib}")
        for scheme, layers in self.fp8.items():
            t = total(layers)
            lines += ["", f"{scheme}: {len(layers)} Linears, rel err max {t.rel_err_max:.3g}, mean "
                      f"{t.rel_err_mean:.3g}, fro {t.rel_err_fro:.3g}; clipped {t.clipped}, subnormal {t.subnormal}, "
                      f"-> 0 {t.flushed}"]
        lines += ["", "FP16 OK: no value becomes inf" if self.ok else "FP16 NOT OK:"]
        lines += [f"- {p}" for p in self.problems()]
        return "\n".join(lines)


class Fp16OverflowError(ValueError):
    """Writing FP16 would put inf into the model; the message names where and the fix."""


def check_writable(audit: Fp16Audit, force: bool = False) -> None:
    """Refuse (Fp16OverflowError) when the audit found values that become inf, unless force."""
    if audit.ok or force:
        return
    problems = audit.problems()
    shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    raise Fp16OverflowError(
        f"FP16 would produce inf in this model:\n  {shown}\n"
        "Keep those parts in BF16 (use --scheme BF16, or FP8 weights with BF16 activations), or pass --force "
        "to write the FP16 checkpoint anyway.")
