"""Model surgery: which Linears get quantized with which scheme, and swapping them for QuantLinear.

Patterns are regular expressions searched in the module's qualified name (`re.search`), e.g.
`lm_head`, `mlp\\.down_proj`, `layers\\.0\\.`. lm_head is skipped by default (tied to the embedding
in many models, and the most sensitive layer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from ..scheme import QuantScheme

DEFAULT_SKIP = ("lm_head",)


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
        _compile(pattern)
        out[pattern] = QuantScheme.parse(scheme)
    return out


def _compile(pattern: str) -> re.Pattern:
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
    """Decide each nn.Linear's fate. Returns ({name: scheme} to quantize, {name: reason} skipped).

    The first matching override wins over the default scheme and over skip patterns (so
    `--override lm_head=W8G128` quantizes the default-skipped lm_head); an override to BF16 means
    "keep this layer unquantized".
    """
    scheme = QuantScheme.parse(scheme)
    overrides = parse_overrides(override)
    skip_res = [(p, _compile(p)) for p in skip]
    planned, skipped = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        chosen = next((s for p, s in overrides.items() if re.search(p, name)), None)
        hit = next((p for p, r in skip_res if r.search(name)), None)
        if chosen is None and hit is not None:
            skipped[name] = f"matches skip pattern {hit!r}"
            continue
        chosen = chosen or scheme
        if chosen.fmt == "bf16":
            skipped[name] = "override to BF16"
            continue
        planned[name] = chosen
    return planned, skipped


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
