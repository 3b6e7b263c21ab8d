"""The Python API the CLI calls: quantize_model swaps QuantLinear into a model in place."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms import ALGORITHMS
from .fp8 import fp8_result
from .nn import DEFAULT_SKIP, QuantLinear, materialize, plan_layers, set_module
from .nn.coverage import coverage
from .scheme import QuantScheme

log = logging.getLogger(__name__)


class CoverageError(ValueError):
    """strict=True and the plan leaves more than 1% of the decoder blocks' weights unquantized."""


@dataclass
class LayerReport:
    scheme: str
    error: float  # relative weight error
    seconds: float
    bytes_before: int
    bytes_after: int
    stats: dict = field(default_factory=dict)


@dataclass
class QuantReport:
    scheme: str
    algo: str
    layers: dict[str, LayerReport] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    e2e: dict = field(default_factory=dict)  # end-to-end scale tuning stats, when run
    coverage: dict = field(default_factory=dict)  # wq.nn.coverage.Coverage.to_dict(): share quantized by kind

    @property
    def mean_error(self) -> float:
        errs = [r.error for r in self.layers.values()]
        return sum(errs) / len(errs) if errs else 0.0

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme,
            "algo": self.algo,
            "seconds": round(self.seconds, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
            "mean_relative_error": self.mean_error,
            "layers": {n: vars(r) for n, r in self.layers.items()},
            "skipped": self.skipped,
            "coverage": self.coverage,
            **({"e2e": self.e2e} if self.e2e else {}),
        }


def quantize_model(
    model: nn.Module,
    scheme: QuantScheme | str,
    *,
    algo: str = "rtn",
    calib=None,
    tokenizer=None,
    skip: Iterable[str] = DEFAULT_SKIP,
    override=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    rotate: bool = False,
    bits_budget: float | None = None,
    bits_candidates: Iterable[str] | None = None,
    budget_format: str | None = None,
    budget_samples: int = 16,
    e2e_steps: int = 0,
    e2e_lr: float | None = None,
    strict: bool = False,
    **algo_args,
) -> QuantReport:
    """Quantize every eligible nn.Linear of `model` in place (QuantLinear swapped in).

    scheme: "W4G128" etc.; algo: a registered algorithm name; calib/tokenizer: calibration text for
    calibrated algorithms; skip/override: regex patterns (see wq.nn.surgery); rotate: first rotate the
    residual stream (wq.transforms.rotate, seeded by algo_args' seed). strict: raise CoverageError,
    before any work, when under 99% of the decoder blocks' weights would be quantized (otherwise that
    is a warning). Returns a QuantReport and records the plan on `model.wq_quant` for wq.save.
    bits_budget: choose each layer's scheme among bits_candidates (wq.budget) so the layers average at
    most that many bits per weight as written by budget_format (default compressed-tensors); `scheme`
    then only names the default for the report. e2e_steps: afterwards, tune every group scale end to
    end on the calibration samples (wq.algorithms.e2e; holds the unquantized model's final hidden
    states meanwhile).
    """
    scheme = QuantScheme.parse(scheme)
    rotation = None
    if rotate:  # before planning: untying the head adds a Linear weight of its own
        from .transforms import rotate_model

        rotation = rotate_model(model, seed=int(algo_args.get("seed") or 0)).to_dict()
    if scheme.is_cast:
        raise ValueError(f"{scheme} is a plain float cast, not a quantization: use wq.cast_model(model, {str(scheme)!r})")
    algorithm = ALGORITHMS.get(algo)(**algo_args)
    budget = None
    if bits_budget is not None:
        from .budget import budget_overrides

        override, budget = budget_overrides(model, scheme, bits_budget, skip=skip, override=override, calib=calib,
                                            tokenizer=tokenizer, candidates=bits_candidates, fmt=budget_format,
                                            samples=budget_samples, **algo_args)
        scheme = QuantScheme.parse(budget.main_scheme())
    plan, skipped = plan_layers(model, scheme, skip=skip, override=override)
    if not plan:
        raise ValueError("no Linear layer left to quantize: check --skip / --override patterns")
    planned = coverage(model, plan, skipped)  # before any work: what the plan will leave unquantized
    if strict and planned.warning():
        raise CoverageError(f"{planned.warning()}. Adjust --skip / --override, or drop --strict to write it anyway")
    if algorithm.needs_calibration and any(s.is_fp8 for s in plan.values()):
        raise ValueError(f"FP8 layers are scaled casts and take no calibration; use --algo rtn with {scheme}")
    unfused = materialize(model, plan)  # fused experts -> per-expert Linears, Conv1D -> Linear
    if unfused:
        log.info("unfused %d MoE experts modules into per-expert Linears (e.g. %s)", len(unfused), unfused[0])
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():  # one line per reason: an MoE has thousands of expert Linears
        log.info("skipping %s: %s", names[0] if len(names) == 1 else f"{len(names)} layers (e.g. {names[0]})",
                 reason)
    report = QuantReport(scheme=str(scheme), algo=algo, skipped=skipped)
    t0 = time.perf_counter()
    e2e = None
    if e2e_steps:
        from .algorithms.e2e import fp_targets
        from .calib.data import calibration_samples

        e2e_samples = calibration_samples(calib, tokenizer, nsamples=int(algo_args.get("nsamples") or 128),
                                          seqlen=int(algo_args.get("seqlen") or 2048), seed=int(algo_args.get("seed") or 0))
        e2e = (e2e_samples, fp_targets(model, e2e_samples))
    if algorithm.needs_calibration:
        from .calib import quantize_calibrated  # the block-by-block pipeline

        quantize_calibrated(model, plan, algorithm, report, calib=calib, tokenizer=tokenizer, device=device,
                            progress=progress)
    else:
        _quantize_data_free(model, plan, algorithm, report, device=device, progress=progress)
    if e2e is not None:
        from .algorithms.e2e import e2e_tune_scales

        report.e2e = e2e_tune_scales(model, *e2e, steps=e2e_steps, lr=e2e_lr or 1e-3,
                                     seed=int(algo_args.get("seed") or 0))
    report.seconds = time.perf_counter() - t0
    cov = coverage(model, skipped=skipped)
    report.coverage = cov.to_dict()
    warning = cov.warning()
    if warning:
        log.warning("%s", warning)
    model.wq_quant = {"scheme": str(scheme), "algo": algo, "algo_args": algo_args,
                      "layers": {n: str(s) for n, s in plan.items()}, "report": report.to_dict(),
                      "coverage": report.coverage}
    if rotation is not None:
        model.wq_quant["rotation"] = rotation
    if budget is not None:
        model.wq_quant["bits_budget"] = budget.to_dict()
    return report


def _quantize_data_free(model, plan, algorithm, report: QuantReport, *, device, progress: bool) -> None:
    bar = tqdm(plan.items(), desc=f"{algorithm.name} {report.scheme}", unit="layer", disable=not progress)
    for name, scheme in bar:
        report.layers[name] = quantize_linear_in_place(model, name, scheme, algorithm, device)
        bar.set_postfix(layer=name.split(".")[-1], err=f"{report.layers[name].error:.4f}")


def quantize_linear_in_place(model: nn.Module, name: str, scheme: QuantScheme, algorithm, device=None) -> LayerReport:
    """Quantize one nn.Linear with a data-free algorithm (or an FP8 cast) and swap in its QuantLinear."""
    dev = torch.device(device) if device else None
    linear = model.get_submodule(name)
    t = time.perf_counter()
    w = linear.weight.detach()
    home = w.device
    if scheme.is_fp8:
        result = fp8_result(w.to(dev) if dev else w, scheme, name=name)
    else:
        result = algorithm.quantize_weight(w.to(dev) if dev else w, scheme)
    set_module(model, name, QuantLinear.from_packed(result.packed.to(home), linear.bias))
    return LayerReport(scheme=str(scheme), error=result.error, seconds=time.perf_counter() - t,
                       bytes_before=w.numel() * w.element_size() + _bias_bytes(linear),
                       bytes_after=result.packed.nbytes() + _bias_bytes(linear), stats=result.stats)


def _bias_bytes(linear: nn.Module) -> int:
    b = getattr(linear, "bias", None)
    return 0 if b is None else b.numel() * b.element_size()
