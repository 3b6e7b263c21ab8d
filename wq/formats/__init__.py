"""Checkpoint formats, registered by name. Importing this package registers them all."""

from . import fp8  # noqa: F401, I001  (first: its reads() is narrower than quant_method alone)
from . import auto_round, compressed_tensors, gptq  # noqa: F401  (registers)
from .base import FORMATS, Format

__all__ = ["FORMATS", "Format"]
