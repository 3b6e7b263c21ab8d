"""Checkpoint formats, registered by name. Importing this package registers them all."""

from . import auto_round, compressed_tensors, gptq  # noqa: F401  (registers)
from .base import FORMATS, Format

__all__ = ["FORMATS", "Format"]
