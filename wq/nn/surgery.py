"""Model surgery: which Linears get quantized with which scheme, and swapping them for QuantLinear.

What can be quantized: every nn.Linear, GPT-2's Conv1D (a Linear with its weight stored [in, out]),
and each projection of each expert of a fused MoE experts module, named as its per-expert module
will be (`mlp.experts.17.gate_proj`, see wq.nn.experts). `materialize` then makes the plan real:
fused experts with a planned projection become a QuantExperts of per-expert nn.Linear, planned
Conv1Ds become nn.Linear (the weight transposed on the way in), so every algorithm sees Linears.

Patterns are regular expressions searched in the module's qualified name (`re.search`), e.g.
`lm_head`, `mlp\\.down_proj`, `layers\\.0\\.`, `experts`. Skipped by default: lm_head (tied to the
embedding in many models, and the most sensitive layer) and MoE routers / shared-expert gates
(small, and every token's expert choice depends on them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from ..scheme import QuantScheme
from .experts import PROJECTIONS, find_fused_experts, fused_layout, unfuse

ROUTER_PATTERNS = (r"(^|\.)(gate|router)$", r"shared_experts?_gate$")  # MoE routers: kept unquantized
DEFAULT_SKIP = ("lm_head", *ROUTER_PATTERNS)


def conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear-like module (nn.Linear, Conv1D), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    conv = conv1d_class()
    if conv is not None and isinstance(module, conv):
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores [in, out]
    return None


def linear_candidates(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every quantizable weight matrix by module name -> (in, out): Linears, Conv1Ds and each expert
    projection of fused experts wq can unfuse (`{path}.{e}.{gate_proj|up_proj|down_proj}`)."""
    out = {}
    fused = find_fused_experts(model)
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in fused):
            continue
        shape = linear_shape(module)
        if shape is not None:
            out[name] = shape
        elif name in fused:
            lay = fused_layout(module)
            if lay is None:
                continue
            for e in range(lay.num_experts):
                for proj in PROJECTIONS:
                    if proj == "gate_proj" and not lay.gated:
                        continue
                    out[f"{name}.{e}.{proj}"] = ((lay.intermediate, lay.hidden) if proj == "down_proj"
                                                 else (lay.hidden, lay.intermediate))
    return out


def parse_overrides(items: Iterable[str] | dict | None) -> dict[str, QuantScheme]:
    """["PATTERN=SCHEME", ...] -> {pattern: scheme}; bad entries name the expected form."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {k: QuantScheme.parse(v) for k, v in items.items()}
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--override {item!r}: expected PATTERN=SCHEME, e.g. 'down_proj=W8G128'")
        pattern, scheme = item.rsplit("=", 1)
        compile_pattern(pattern)
        out[pattern] = QuantScheme.parse(scheme)
    return out


def compile_pattern(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from e


def plan_layers(
    model: nn.Module,
    scheme: QuantScheme | str,
    *,
    skip: Iterable[str] = DEFAULT_SKIP,
    override: dict[str, QuantScheme] | Iterable[str] | None = None,
) -> tuple[dict[str, QuantScheme], dict[str, str]]:
    """Decide the fate of each Linear-like weight (see linear_candidates). Returns ({name: scheme} to
    quantize, {name: reason} skipped).

    The first matching override wins over the default scheme and over skip patterns (so
    `--override lm_head=W8G128` quantizes the default-skipped lm_head); an override to BF16 means
    "keep this layer unquantized".
    """
    scheme = QuantScheme.parse(scheme)
    overrides = parse_overrides(override)
    skip_res = [(p, compile_pattern(p)) for p in skip]
    planned, skipped = {}, {}
    for name in linear_candidates(model):
        chosen, why = decide(name, scheme, overrides, skip_res)
        if chosen is None:
            skipped[name] = why
        else:
            planned[name] = chosen
    return planned, skipped


def decide(name: str, scheme: QuantScheme, overrides: dict[str, QuantScheme],
           skips: list[tuple[str, re.Pattern]]) -> tuple[QuantScheme | None, str | None]:
    """One weight's fate: (scheme, None) to quantize it, (None, reason) to keep it. The first matching
    override wins over the default scheme and over the skip patterns; an override to BF16 keeps it."""
    chosen = next((s for p, s in overrides.items() if re.search(p, name)), None)
    hit = next((p for p, r in skips if r.search(name)), None)
    if chosen is None and hit is not None:
        return None, ("MoE router (kept in full precision by default)" if hit in ROUTER_PATTERNS
                      else f"matches skip pattern {hit!r}")
    chosen = chosen or scheme
    if chosen.fmt == "bf16":
        return None, "override to BF16"
    return chosen, None


def materialize(model: nn.Module, plan: dict[str, QuantScheme], within: str | None = None) -> list[str]:
    """Make every planned name a real nn.Linear: unfuse fused experts that have a planned projection
    (QuantExperts, views of the fused weights) and turn planned Conv1Ds into nn.Linear. `within`: only
    under this module name (a streamed block just loaded). Returns the names of the experts modules
    unfused. Idempotent."""
    def inside(name: str) -> bool:
        return within is None or name == within or name.startswith(within + ".")

    unfused = []
    for path, module in find_fused_experts(model).items():
        if inside(path) and fused_layout(module) is not None and any(n.startswith(path + ".") for n in plan):
            set_module(model, path, unfuse(module))
            unfused.append(path)
    conv = conv1d_class()
    if conv is not None:
        for name in plan:
            if not inside(name):
                continue
            module = model.get_submodule(name)
            if isinstance(module, conv):
                set_module(model, name, conv1d_to_linear(module))
    return unfused


def conv1d_to_linear(module: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D (y = x @ W + b, W [in, out]) as the nn.Linear it is (weight W^T, a view)."""
    n_in, n_out = module.weight.shape
    lin = nn.Linear(n_in, n_out, bias=module.bias is not None, device="meta")
    lin.weight = nn.Parameter(module.weight.detach().t(), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        lin.bias = module.bias
    return lin


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
