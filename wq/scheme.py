"""QuantScheme: what a weight becomes. Parsed from strings such as "W4G128", "W3G128-sym", "FP8".

Grammar (DESIGN.md Contracts):
    W<b>G<g>[-sym|-asym]   b in {2,3,4,8}, g in {-1,32,64,128,256}; "W<b>" alone = "W<b>G-1"
    BF16 | FP16            plain casts
    FP8 | FP8G<g>          E4M3 weights, per-channel or per-group scale; suffix -e5m2 for E5M2
Defaults: symmetric at 4/8 bits (fast serving paths), asymmetric at 2/3 bits (quality).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

INT_BITS = (2, 3, 4, 8)
GROUP_SIZES = (-1, 32, 64, 128, 256)
FLOAT_FORMATS = ("bf16", "fp16", "e4m3", "e5m2")

GRAMMAR = (
    "W<bits>G<group>[-sym|-asym] with bits in {2,3,4,8} and group in {-1,32,64,128,256} "
    "(e.g. W4G128, W4G-1, W3G128-sym, W8 = W8G-1); or BF16, FP16, FP8, FP8G<group>, with -e5m2 for E5M2 FP8"
)

_INT_RE = re.compile(r"^W(?P<bits>\d+)(?:G(?P<group>-?\d+))?(?:-(?P<sym>sym|asym))?$", re.IGNORECASE)
_FP8_RE = re.compile(r"^FP8(?:G(?P<group>-?\d+))?(?:-(?P<fmt>e4m3|e5m2))?$", re.IGNORECASE)


class SchemeError(ValueError):
    """A scheme string or value that wq does not accept; the message shows the grammar."""


@dataclass(frozen=True)
class QuantScheme:
    bits: int  # 2/3/4/8 integer codes; 16 for BF16/FP16; 8 for FP8
    group_size: int = -1  # -1: one group per output row
    sym: bool = True
    fmt: str = "int"  # "int" or one of FLOAT_FORMATS

    # ------------------------------------------------------------------ parsing and printing
    @classmethod
    def parse(cls, text: str | QuantScheme) -> QuantScheme:
        if isinstance(text, QuantScheme):
            return text
        s = str(text).strip()
        up = s.upper()
        if up in ("BF16", "FP16"):
            return cls(bits=16, group_size=-1, sym=True, fmt=up.lower())
        m = _FP8_RE.match(s)
        if m:
            group = int(m["group"]) if m["group"] is not None else -1
            return cls(bits=8, group_size=group, sym=True, fmt=(m["fmt"] or "e4m3").lower()).validate(s)
        m = _INT_RE.match(s)
        if not m:
            raise SchemeError(f"cannot parse scheme {text!r}; expected {GRAMMAR}")
        bits = int(m["bits"])
        group = int(m["group"]) if m["group"] is not None else -1
        sym = (m["sym"].lower() == "sym") if m["sym"] else bits in (4, 8)
        return cls(bits=bits, group_size=group, sym=sym, fmt="int").validate(s)

    def validate(self, text: str | None = None) -> QuantScheme:
        what = repr(text) if text is not None else str(self)
        if self.fmt not in ("int",) + FLOAT_FORMATS:
            raise SchemeError(f"scheme {what}: unknown format {self.fmt!r}; expected {GRAMMAR}")
        if self.fmt == "int" and self.bits not in INT_BITS:
            raise SchemeError(f"scheme {what}: {self.bits}-bit integers are not supported; expected {GRAMMAR}")
        if self.fmt in ("bf16", "fp16") and (self.bits != 16 or self.group_size != -1):
            raise SchemeError(f"scheme {what}: {self.fmt.upper()} is a plain cast without groups")
        if self.group_size not in GROUP_SIZES:
            raise SchemeError(f"scheme {what}: group size {self.group_size} is not supported; expected {GRAMMAR}")
        return self

    def __str__(self) -> str:
        if self.fmt in ("bf16", "fp16"):
            return self.fmt.upper()
        if self.is_fp8:
            g = f"G{self.group_size}" if self.group_size != -1 else ""
            return f"FP8{g}" + ("-e5m2" if self.fmt == "e5m2" else "")
        default_sym = self.bits in (4, 8)
        suffix = "" if self.sym == default_sym else ("-sym" if self.sym else "-asym")
        return f"W{self.bits}G{self.group_size}{suffix}"

    # ------------------------------------------------------------------ derived facts
    @property
    def is_int(self) -> bool:
        return self.fmt == "int"

    @property
    def is_fp8(self) -> bool:
        return self.fmt in ("e4m3", "e5m2")

    @property
    def is_cast(self) -> bool:
        return self.fmt in ("bf16", "fp16")

    @property
    def maxq(self) -> int:
        """Largest integer code: codes live in [0, 2**bits - 1]."""
        return 2**self.bits - 1

    def group_for(self, in_features: int) -> int:
        """The effective group length along the input dimension (G-1 -> whole row)."""
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int) -> int:
        """Groups per row; the last one may be partial (576 with G128 -> 5 groups)."""
        return math.ceil(in_features / self.group_for(in_features))

    def bits_per_weight(self, in_features: int = 4096) -> float:
        """Storage cost per weight: codes plus 16-bit scale (and zero) per group; W4G128 -> 4.25."""
        if self.is_cast:
            return 16.0
        per_group = 32 if self.is_int else 16  # int: fp16 scale + zero (as DESIGN counts); fp8: scale
        return self.bits + per_group * self.n_groups(in_features) / in_features

    def to_dict(self) -> dict:
        return {"scheme": str(self), **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> QuantScheme:
        if "scheme" in d:
            return cls.parse(d["scheme"])
        return cls(bits=d["bits"], group_size=d["group_size"], sym=d["sym"], fmt=d.get("fmt", "int")).validate()
