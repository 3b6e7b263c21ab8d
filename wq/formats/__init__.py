"""Checkpoint formats, registered by name. Importing this package registers them all."""

from . import fp8, gptq  # noqa: F401  (registers; fp8 first: its reads() is narrower than quant_method alone)
from .base import FORMATS, Format

__all__ = ["FORMATS", "Format"]
