"""Kernels: the torch reference plus fast paths, chosen by `dispatch.select`."""

# registers the CPU kernels (the AVX2 extension builds lazily) and the Triton ones (triton imported lazily)
from . import cpu_aten, cpu_native, triton_backend  # noqa: F401
from .dispatch import KERNELS, Kernel, force_kernel, matmul, select
from .reference import reference_matmul

__all__ = ["KERNELS", "Kernel", "force_kernel", "matmul", "reference_matmul", "select"]
