"""What a Triton launch is, as data: one `Launch` per kernel call, built by the launchers' pure
`plan_*` functions from a `WeightMeta` (no tensors), so the AOT compile check (triton_aot.py) compiles
exactly the kernels, constexprs and options the launchers would launch.

Also the per-device facts the launchers need (config family, SM count) and `interpreting()`, which
asks the kernel object itself rather than `triton.knobs` (that module only exists from Triton 3.4).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from .triton_configs import TileConfig, config, family_for


@dataclass(frozen=True)
class WeightMeta:
    """What the kernels specialize on, without the tensors."""

    bits: int
    group: int  # effective group length (G-1 -> K)
    in_features: int
    out_features: int
    const_zero: int  # -1: zeros are read; else every zero point equals it
    act_order: bool  # K was permuted at prepare time (x is read through perm)

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group)

    @property
    def group_arg(self) -> int:
        """G as the kernels see it: one constant for every single-group (per-channel) layer, so that a
        model's many K values do not each compile their own kernel."""
        return self.group if self.n_groups > 1 else 1 << 30

    @classmethod
    def of(cls, tw) -> WeightMeta:
        return cls(tw.bits, tw.group, tw.in_features, tw.out_features, tw.const_zero, tw.perm is not None)


@dataclass(frozen=True)
class Launch:
    """kernel[grid](**ptrs, **ints, **constexprs, num_warps=, num_stages=): ptrs maps each pointer
    argument to its element dtype (None: passed as None, a constexpr), ints the runtime integers."""

    kernel: Any  # a triton JITFunction (or the interpreter's wrapper)
    grid: tuple[int, ...]
    num_warps: int
    num_stages: int
    ptrs: dict[str, torch.dtype | None]
    ints: dict[str, int]
    constexprs: dict[str, Any] = field(default_factory=dict)


def run(launch: Launch, **tensors) -> None:
    """Launch with the given tensors for launch.ptrs (same names)."""
    missing = set(launch.ptrs) - set(tensors)
    if missing:
        raise TypeError(f"tensors missing for {sorted(missing)}")
    launch.kernel[launch.grid](**tensors, **launch.ints, **launch.constexprs, num_warps=launch.num_warps,
                               num_stages=launch.num_stages)


def interpreting(kernel: Any) -> bool:
    """True when `kernel` was built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class DeviceFamily:
    family: str
    sms: int

    def config(self, path: str, bits: int) -> TileConfig:
        return config(self.family, path, bits)


@functools.cache
def _cuda_family(index: int) -> DeviceFamily:
    props = torch.cuda.get_device_properties(index)
    hip = getattr(torch.version, "hip", None) is not None
    return DeviceFamily(family_for((props.major, props.minor), hip=hip), props.multi_processor_count)


def device_family(device: torch.device) -> DeviceFamily:
    """The config family and SM count of a CUDA device; CPU tensors (the interpreter) get the sm90
    rows and a pretend 4 SMs, so that interpreter tests run the real tile shapes with split-K."""
    if device.type != "cuda":
        return DeviceFamily("sm90", 4)
    return _cuda_family(device.index if device.index is not None else torch.cuda.current_device())
