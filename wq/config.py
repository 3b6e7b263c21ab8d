"""QuantConfig: the one description of a quantization run.

The same dataclass is the CLI's flags (built from the field metadata below, never listed twice),
the YAML recipes in configs/ (`--recipe FILE`), and the "recipe" block of each checkpoint's wq.json.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _f(default, help: str, *, flag: str | None = None, short: str | None = None, choices=None,
       repeat: bool = False, metavar: str | None = None, cli: bool = True):
    meta = {"help": help, "flag": flag, "short": short, "choices": choices, "repeat": repeat,
            "metavar": metavar, "cli": cli}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class QuantConfig:
    # what and where
    model: str | None = _f(None, "Hugging Face hub id or local directory; omit (or 'default') for the bundled "
                           "SmolLM2-135M-Instruct", cli=False)
    scheme: str = _f("W4G128", "quantization scheme: W<bits>G<group>[-sym|-asym] (bits 2/3/4/8, group "
                     "-1/32/64/128/256; symmetric by default at 4/8 bits, asymmetric at 2/3), or BF16/FP16/FP8")
    algo: str = _f("rtn", "algorithm: rtn (no data); gptq, autoround, awq or recon (calibrated)")
    output: str | None = _f(None, "output directory, required (written atomically: temp dir, then rename)",
                            flag="--output", short="-o")
    format: list[str] = _f([], "checkpoint format, repeatable (several write OUT/<format>/); default: the "
                           "one that gives fast vLLM kernels for the scheme", repeat=True)
    overwrite: bool = _f(False, "replace OUT if it is a checkpoint wq wrote; the old one is deleted only after the "
                         "new one is complete")
    overwrite_non_checkpoint: bool = _f(False, "with --overwrite, also replace an OUT that wq did not write "
                                        "(everything in it is deleted)")
    device: str | None = _f(None, "compute device for quantization (cpu, cuda, cuda:1); default: cuda if "
                            "available else cpu")
    skip: list[str] = _f(["lm_head", r"(^|\.)(gate|router)$", r"shared_experts?_gate$"],
                         "regex of Linear names to leave unquantized, repeatable (default: lm_head and MoE "
                         "routers / shared-expert gates); expert projections are named like "
                         "'mlp.experts.17.gate_proj'", repeat=True, metavar="PATTERN")
    override: list[str] = _f([], "per-layer scheme, repeatable: PATTERN=SCHEME, e.g. 'down_proj=W8G128' "
                             "(mixed precision; =BF16 keeps the layer unquantized)", repeat=True,
                             metavar="PATTERN=SCHEME")
    strict: bool = _f(False, "fail (before any work) when less than 99%% of the decoder blocks' weights would be "
                      "quantized, instead of warning")
    mse: bool = _f(False, "rtn: search a per-group clipping of the range that minimises the error")
    rotate: bool = _f(False, "rotate the residual stream (randomized Hadamard) and attention heads first, folded "
                      "into the weights: the checkpoint stays a plain model (a tied lm_head gets untied, logged). "
                      "Measured on SmolLM2 (docs/quality.md): helps gptq and awq+gptq, hurts rtn, awq+rtn and autoround")
    bits_budget: float | None = _f(None, "mixed precision: average bits per quantized weight (codes, scales and "
                                   "zero points as the format writes them); each layer's scheme is chosen from "
                                   "--bits-candidates by measured sensitivity, --scheme is ignored",
                                   metavar="BITS")
    bits_candidates: list[str] = _f([], "schemes --bits-budget chooses from, repeatable (default: W2G64 W2G128 "
                                    "W3G64 W3G128 W4G64 W4G128 W8G128)", repeat=True, metavar="SCHEME")
    budget_samples: int = _f(16, "--bits-budget: calibration samples (of --nsamples) its sensitivity measurement "
                             "backpropagates through the whole model")
    # calibration
    calib: str | None = _f(None, "calibration text: a Hub dataset name, a local .txt/.jsonl file or folder; "
                           "default: the shipped Jane Austen corpus (Emma)")
    nsamples: int = _f(128, "calibration samples")
    seqlen: int = _f(2048, "calibration sample length in tokens (clipped to the text and the model)")
    seed: int = _f(0, "random seed for sample selection and algorithms")
    batch_size: int = _f(8, "calibration batch size")
    low_mem: bool = _f(False, "keep calibration activations on CPU between blocks, and hand freed memory back to "
                       "the OS at once (streamed gptq always does the latter; autoround: about 25%% less peak memory "
                       "on CPU for about 20%% more time)")
    model_free: bool = _f(True, "rtn, FP8 and BF16 go tensor by tensor through the shards without building the model "
                          "(FP16 too when the model does not fit in memory; its activation audit needs the model)")
    stream: bool = _f(True, "read the model block by block from its safetensors shards, staging finished blocks "
                      "on disk, so memory does not grow with the model; --no-stream loads it whole first (rtn, FP8 and "
                      "BF16 still go model-free unless --no-model-free is given too)")
    hessian_budget: float = _f(4.0, "gptq: GiB of Hessians held at once; a block needing more is calibrated in "
                               "several passes (same result)")
    resume: bool = _f(False, "continue an interrupted calibrated run from its last finished block")
    # algorithm settings
    damp: float = _f(0.01, "gptq: Hessian damping as a fraction of its mean diagonal")
    act_order: bool = _f(False, "gptq: quantize columns in order of decreasing Hessian diagonal "
                         "(static groups keep g_idx valid)")
    block_size: int = _f(128, "gptq: columns per lazy-update block")
    expert_min_tokens: int = _f(128, "gptq: an MoE expert the router sends fewer calibration tokens than this is "
                                "quantized with the Hessian of all tokens (logged and in the report)")
    iters: int = _f(200, "autoround: signed-gradient iterations per block; recon: Adam steps per block")
    lr: float | None = _f(None, "autoround: learning rate (default 1/iters); recon: of the rounding offsets "
                          "(default 0.02)")
    scale_lr: float | None = _f(None, "recon: learning rate of the group scales and zero points (default 1.5 lr)")
    recon_batch: int = _f(1, "recon: calibration samples per Adam step")
    init: str = _f("rtn", "recon: initial quantizer (rtn, gptq: MSE-searched ranges; autoround)")
    init_iters: int = _f(50, "recon --init autoround: autoround's iterations")
    quantizer: str = _f("rtn", "awq: quantizer of the scaled weights (rtn with clipping search, gptq, autoround, "
                        "recon)")
    e2e_steps: int = _f(0, "after the blocks: Adam steps (one calibration sample each) tuning every group scale "
                        "end to end on the final hidden states; needs the calibration set's fp hidden states "
                        "and one fp32 copy of the codes in memory (0: off)")
    e2e_lr: float | None = _f(None, "learning rate of --e2e-steps (scale multipliers; default 1e-3)")
    # evaluation
    eval: bool = _f(False, "after saving, evaluate perplexity (and --eval-tasks) against the unquantized model")
    eval_seqlen: int = _f(2048, "evaluation window length in tokens")
    eval_windows: int | None = _f(None, "evaluate at most this many windows (default: all)")
    eval_ppl: list[str] = _f([], "perplexity datasets for --eval, repeatable (default: wikitext2, or the "
                             "Austen corpus for the bundled model)", repeat=True, metavar="NAME|FILE")
    eval_tasks: list[str] = _f([], "lm-eval tasks or presets for --eval, repeatable", repeat=True)
    # publishing
    push_to_hub: str | None = _f(None, "after saving, upload to this Hub repo id with a model card",
                                 metavar="REPO_ID")
    private: bool = _f(False, "create the Hub repo as private")
    revision: str | None = _f(None, "Hub branch to upload to")
    force: bool = _f(False, "write even when the audit finds problems (FP16 overflow)")

    # -------------------------------------------------------------------------------- dicts
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown recipe keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> QuantConfig:
        path = resolve_recipe(path)
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe is a YAML mapping of QuantConfig fields")
        return cls.from_dict({k.replace("-", "_"): v for k, v in data.items()})

    def algo_args(self) -> dict[str, Any]:
        """Settings handed to the algorithm (each algorithm takes what it knows)."""
        return {k: getattr(self, k) for k in ("mse", "damp", "act_order", "block_size", "iters", "lr", "seed",
                                              "expert_min_tokens", "scale_lr", "recon_batch", "init",
                                              "init_iters", "quantizer")}

    def model_args(self) -> dict[str, Any]:
        """Whole-model settings of wq.quantize_model (transforms and the plan), beside the algorithm's."""
        return {"rotate": self.rotate, "bits_budget": self.bits_budget,
                "bits_candidates": self.bits_candidates or None, "budget_samples": self.budget_samples,
                "budget_format": self.format[0] if self.format else None, "e2e_steps": self.e2e_steps,
                "e2e_lr": self.e2e_lr}

    # -------------------------------------------------------------------------------- CLI
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field, from the field metadata; defaults come from --recipe or the dataclass."""
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if not meta.get("cli", True):
                continue
            names = [meta.get("flag") or "--" + f.name.replace("_", "-")]
            if meta.get("short"):
                names.insert(0, meta["short"])
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            help_text = meta["help"]
            kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
            if isinstance(default, bool):
                kw["action"] = argparse.BooleanOptionalAction
                help_text += f" (default: {default})"
            elif meta.get("repeat"):
                kw["action"] = "append"
                kw["metavar"] = meta.get("metavar") or f.name.upper()
            else:
                kw["type"] = _field_type(f.type)
                kw["metavar"] = meta.get("metavar") or f.name.upper()
                if default is not None and "default" not in help_text:  # each default said once
                    help_text += f" (default: {default})"
            parser.add_argument(*names, help=help_text, **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace, base: QuantConfig | None = None) -> QuantConfig:
        """Flags given on the command line override the recipe (or defaults)."""
        cfg = dataclasses.replace(base) if base else cls()
        for f in dataclasses.fields(cls):
            if not hasattr(args, f.name):
                continue
            value = getattr(args, f.name)
            if f.metadata.get("repeat"):  # repeated flags add to the recipe's (or default) list
                value = list(dict.fromkeys(list(getattr(cfg, f.name)) + list(value)))
            setattr(cfg, f.name, value)
        return cfg


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each flag's default once: appended unless the help already says it or there
    is none to say (None, on/off switches)."""

    def _get_help_string(self, action):
        text = action.help or ""
        quiet = action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or "default" in text
        return text if quiet or not action.option_strings else f"{text} (default: %(default)s)"


def _field_type(annotation: str):
    a = str(annotation)
    if "int" in a:
        return int
    if "float" in a:
        return float
    return str


RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs"  # the bundled recipes (a source checkout)


def resolve_recipe(name: str | Path) -> Path:
    """A recipe path as given, or a bundled recipe's bare name ("fast" -> configs/fast.yaml)."""
    path = Path(name)
    if path.exists():
        return path
    bundled = RECIPES_DIR / f"{name}.yaml"
    if not path.suffix and bundled.exists():
        return bundled
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise FileNotFoundError(f"recipe {name!r} not found: give a YAML file or one of the bundled recipes "
                            f"({', '.join(known) or 'none found next to the package'})")
