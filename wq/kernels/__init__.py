"""Kernels: the torch reference plus fast paths, chosen by `dispatch.select`."""

from . import triton_backend  # noqa: E402,F401  registers the Triton kernels (imports triton lazily)
from .dispatch import KERNELS, Kernel, force_kernel, matmul, select
from .reference import reference_matmul

__all__ = ["KERNELS", "Kernel", "force_kernel", "matmul", "reference_matmul", "select"]
