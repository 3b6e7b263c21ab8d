"""Function-preserving transforms of the unquantized model, applied before quantization.

    hadamard.py   orthogonal (randomized Hadamard) matrices of any size wq meets
    layout.py     where a decoder block reads and writes its residual stream (norms, readers, writers)
    fold.py       pure per-module edits: fold a norm's scale into its readers, rotate or scale a Linear's
                  inputs / outputs
    rotate.py     --rotate: the residual stream (and each attention head's values) rotated, folded
                  into the weights, so the checkpoint stays a plain model of the same architecture
"""

from .layout import BlockLayout, block_layout
from .rotate import RotationInfo, rotate_model

__all__ = ["BlockLayout", "RotationInfo", "block_layout", "rotate_model"]
