"""Quantization algorithms, registered by name. Importing this package registers them all."""

from . import autoround, awq, gptq, recon, rtn  # noqa: F401  (registers)
from .base import ALGORITHMS, Algorithm, QuantResult

__all__ = ["ALGORITHMS", "Algorithm", "QuantResult"]
