"""The codes of a block-learning algorithm's best iterate, held at the scheme's own bit width.

autoround keeps the integer codes of its best iterate (not its offsets V, 2 bytes a weight): they are all the
export and the final loss need. Stored as wq.packing's int32 words along the group (bits/8 bytes a weight for
2, 3, 4 and 8 bits: 1/4 byte at W2, 1/2 at W4), uint8 for the widths wq.packing does not pack.

Shapes: codes [out, ng, G] with values in [0, 2**bits).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..packing import pack, unpack

_PACKED_BITS = (2, 3, 4, 8)


class KeptCodes:
    """Codes [out, ng, G] packed along G; `rows(r0, r1)` gives them back as int32 [r1 - r0, ng, G]."""

    def __init__(self, q: Tensor, bits: int):
        self.shape = q.shape
        self.bits = bits
        self.words = self._pack(q)

    def _pack(self, q: Tensor) -> Tensor:
        if self.bits in _PACKED_BITS:
            return pack(q, self.bits, dim=2)  # [out, ng, words]
        return q.to(torch.uint8 if self.bits <= 8 else torch.int16, copy=True)

    @torch.no_grad()
    def copy_(self, q: Tensor) -> None:
        """Hold the codes q [out, ng, G] instead, in the same storage."""
        self.words.copy_(self._pack(q))

    def rows(self, r0: int = 0, r1: int | None = None) -> Tensor:
        """The codes of rows r0:r1, int32 [rows, ng, G]."""
        w = self.words[r0:r1]
        if self.bits in _PACKED_BITS:
            return unpack(w, self.bits, self.shape[2], dim=2)
        return w.to(torch.int32)

    def nbytes(self) -> int:
        return self.words.numel() * self.words.element_size()
