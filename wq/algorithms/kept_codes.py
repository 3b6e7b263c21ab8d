"""The codes of a block-learning algorithm's best iterate, held in a fraction of a byte each.

autoround keeps the integer codes of its best iterate (not its offsets V, 2 bytes a weight): they are all the
export and the final loss need. Several codes share a byte (four of up to 2 bits, two of up to 4 bits, one
above: 1/4 byte a weight at W2, 1/2 at W3 and W4), packed with uint8 shifts only: the copy is taken at every new
best iterate, so it must be cheap (int64 temporaries, as wq.packing's int32 words need, were most of the
allocations of an autoround step).

Shapes: codes [out, ng, G] with values in [0, 2**bits); words [out, ng, ceil(G / per_byte)].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def per_byte(bits: int) -> int:
    """Codes held in one byte: 4 up to 2 bits, 2 up to 4 bits, else 1."""
    return 4 if bits <= 2 else 2 if bits <= 4 else 1


class KeptCodes:
    """Codes [out, ng, G] packed along G; `rows(r0, r1)` gives them back as [r1 - r0, ng, G] (uint8, int16 above
    8 bits)."""

    def __init__(self, q: Tensor, bits: int):
        self.shape = q.shape
        self.bits = bits
        self.per = per_byte(bits)
        self.words = self._pack(q)

    def _pack(self, q: Tensor) -> Tensor:
        if self.bits > 8:
            return q.to(torch.int16, copy=True)
        if self.per == 1:
            return q.to(torch.uint8, copy=True)
        width = 8 // self.per
        q = q.to(torch.uint8)
        pad = -q.shape[2] % self.per
        if pad:
            q = F.pad(q, (0, pad))
        q = q.view(*q.shape[:2], -1, self.per)  # [out, ng, G / per, per]
        words = q[..., 0].clone()
        for j in range(1, self.per):
            words |= q[..., j] << (j * width)
        return words

    @torch.no_grad()
    def copy_(self, q: Tensor) -> None:
        """Hold the codes q [out, ng, G] instead, in the same storage."""
        self.words.copy_(self._pack(q))

    def rows(self, r0: int = 0, r1: int | None = None) -> Tensor:
        """The codes of rows r0:r1 [rows, ng, G]."""
        w = self.words[r0:r1]
        if self.per == 1:
            return w
        width = 8 // self.per
        mask = (1 << width) - 1
        out = torch.empty(*w.shape, self.per, dtype=torch.uint8, device=w.device)
        for j in range(self.per):
            torch.bitwise_and(w >> (j * width), mask, out=out[..., j])
        return out.view(*w.shape[:2], -1)[:, :, : self.shape[2]]

    def nbytes(self) -> int:
        return self.words.numel() * self.words.element_size()
