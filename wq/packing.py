"""Pack integer codes into int32 words and back, and PackedWeight, the one in-memory quantized layer.

Bit layout: a little-endian bit stream along the packed dimension. Value j of a run of 32 values
occupies bits [j*b, (j+1)*b) of the run's b words, LSB first. For b in {2, 4, 8} every value sits
inside one word (32/b values per word); for b = 3, 32 values fill 3 words and values 10 and 21
straddle word boundaries. This is the GPTQ layout; formats that differ convert in their own file.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .primitives import SCALE_DTYPE, dequantize, row_chunks
from .scheme import QuantScheme


def packed_size(n: int, bits: int) -> int:
    """int32 words that hold n codes of `bits` bits (n padded to a multiple of 32)."""
    return -(-n // 32) * bits


# codes packed per slice on the CPU: int64 temporaries of 2 MiB, which also stay in cache (one 5632 x 2048
# weight: 230 -> 14 MiB of peak temporaries and 3x faster than 2**22); accelerators take large slices
_PACK_AT_ONCE = 2**18
_PACK_AT_ONCE_ACCEL = 2**24


def pack(q: Tensor, bits: int, dim: int = 0) -> Tensor:
    """Codes (any int dtype, values in [0, 2**bits)) -> int32 packed along `dim`."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"cannot pack {bits}-bit codes; supported: 2, 3, 4, 8")
    q = q.movedim(dim, 0)
    at_once = _PACK_AT_ONCE if q.device.type == "cpu" else _PACK_AT_ONCE_ACCEL
    if q.dim() > 1 and q.numel() > at_once:
        # columns are packed independently: slices of them bound the int64 temporaries (~3 int64 copies of the
        # codes at once: 276 MiB for one 5632 x 2048 weight, more than 10x its bf16 size)
        # The slices are written into one preallocated result: a list of small packed parts between the
        # freed int64 temporaries fragmented glibc's heap (up to ~90 MiB kept after one 5632 x 2048 weight).
        flat = q.reshape(q.shape[0], -1)  # [n, rest]
        step = max(1, at_once // q.shape[0])
        words = torch.empty((packed_size(q.shape[0], bits), flat.shape[1]), dtype=torch.int32, device=q.device)
        for c in range(0, flat.shape[1], step):
            words[:, c:c + step] = pack(flat[:, c:c + step], bits, 0)
        return words.reshape(-1, *q.shape[1:]).movedim(0, dim).contiguous()
    q = q.to(torch.int64)
    n = q.shape[0]
    pad = -n % 32
    if pad:
        q = torch.cat([q, q.new_zeros((pad,) + tuple(q.shape[1:]))], 0)
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # 2/4/8 bits: each value inside one word; shift and sum the 32/b values per word
        per = 32 // bits
        shifts = (torch.arange(per, device=q.device) * bits).view(1, per, *([1] * (q.dim() - 1)))
        words = ((q.reshape(-1, per, *q.shape[1:]) & mask) << shifts).sum(1)  # [n_words, ...]
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        return words.movedim(0, dim).contiguous()
    runs = q.reshape(-1, 32, *q.shape[1:])  # [n_runs, 32, ...]
    words = torch.zeros((runs.shape[0], bits) + tuple(q.shape[1:]), dtype=torch.int64, device=q.device)
    for j in range(32):
        v = runs[:, j] & mask
        word, shift = divmod(j * bits, 32)
        words[:, word] |= (v << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # straddles into the next word (3-bit only)
            words[:, word + 1] |= v >> (32 - shift)
    words = words.reshape(-1, *q.shape[1:])
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def unpack(packed: Tensor, bits: int, n: int, dim: int = 0) -> Tensor:
    """int32 packed along `dim` -> int32 codes, `n` of them along `dim`."""
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # 2/4/8 bits: arithmetic shifts are fine, the mask keeps the low bits only
        p = packed.movedim(dim, 0)
        per = 32 // bits
        shifts = (torch.arange(per, device=p.device, dtype=torch.int32) * bits).view(1, per, *([1] * (p.dim() - 1)))
        q = ((p.unsqueeze(1) >> shifts) & mask).reshape(-1, *p.shape[1:])[:n]
        return q.to(torch.int32).movedim(0, dim).contiguous()
    p = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    runs = p.reshape(-1, bits, *p.shape[1:])  # [n_runs, bits, ...]
    out = []
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        v = runs[:, word] >> shift
        if shift + bits > 32:
            v = v | (runs[:, word + 1] << (32 - shift))
        out.append(v & mask)
    q = torch.stack(out, 1).reshape(-1, *p.shape[1:])[:n]
    return q.to(torch.int32).movedim(0, dim).contiguous()


_DEQUANT_CHUNK = 1 << 20  # elements per dequantized row chunk (4 MiB in fp32)


@dataclass
class PackedWeight:
    """A quantized Linear weight [out_features, in_features], GPTQ-style tensors.

    qweight: int32 [packed_size(in, bits), out]   codes packed along the input dimension
    scales:  fp16  [n_groups, out]
    zeros:   uint8 [n_groups, out]                 exact integer zero points (no GPTQ "minus one")
    g_idx:   int32 [in] or None                    group of each input channel (None: i // group)
    """

    qweight: Tensor
    scales: Tensor
    zeros: Tensor
    scheme: QuantScheme
    in_features: int
    out_features: int
    g_idx: Tensor | None = None

    @classmethod
    def from_codes(
        cls, q: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme, g_idx: Tensor | None = None
    ) -> PackedWeight:
        """q: [out, in] codes; scale, zero: [out, n_groups] (the algorithms' orientation)."""
        out_f, in_f = q.shape
        assert scale.shape == (out_f, scheme.n_groups(in_f)), (scale.shape, scheme, in_f)
        if g_idx is not None and torch.equal(g_idx.cpu(), default_g_idx(in_f, scheme)):
            g_idx = None
        return cls(
            qweight=pack(q.t(), scheme.bits, dim=0),
            scales=scale.t().to(SCALE_DTYPE).contiguous(),
            zeros=zero.t().round().to(torch.uint8).contiguous(),
            scheme=scheme,
            in_features=in_f,
            out_features=out_f,
            g_idx=None if g_idx is None else g_idx.to(torch.int32),
        )

    @classmethod
    def cat_out(cls, parts: list[PackedWeight]) -> PackedWeight:
        """Slices of output rows (each from_codes of rows [r0, r1) of one weight) -> the whole weight: codes are
        packed along the input dimension, so output rows are columns of every tensor here."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        assert all(p.g_idx is None and p.in_features == first.in_features for p in parts), "cat_out: one weight's rows"
        return cls(qweight=torch.cat([p.qweight for p in parts], 1), scales=torch.cat([p.scales for p in parts], 1),
                   zeros=torch.cat([p.zeros for p in parts], 1), scheme=first.scheme, in_features=first.in_features,
                   out_features=sum(p.out_features for p in parts))

    def rows(self, start: int, stop: int) -> PackedWeight:
        """Output rows [start, stop) as a PackedWeight of their own (views: output rows are columns here)."""
        return replace(self, qweight=self.qweight[:, start:stop], scales=self.scales[:, start:stop],
                       zeros=self.zeros[:, start:stop], out_features=stop - start)

    @property
    def group(self) -> int:
        return self.scheme.group_for(self.in_features)

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    def codes(self) -> Tensor:
        """int32 [out, in]."""
        return unpack(self.qweight, self.scheme.bits, self.in_features, dim=0).t()

    def group_index(self) -> Tensor:
        """int64 [in]: group of each input channel."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return default_g_idx(self.in_features, self.scheme).to(self.qweight.device).long()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """[out, in] weights in `dtype` (computed in fp32), a few rows at a time: a whole weight's int32 codes
        and fp32 temporaries would be ~4x the result (~190 MiB beside a 5632 x 2048 down_proj's 46).
        Elementwise, so the same values as in one piece."""
        chunks = row_chunks(self.out_features, self.in_features, _DEQUANT_CHUNK)
        if len(chunks) == 1:
            return self._dequantize(dtype)
        w = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.qweight.device)  # [out, in]
        for r0, r1 in chunks:
            w[r0:r1] = self.rows(r0, r1)._dequantize(dtype)
        return w

    def _dequantize(self, dtype: torch.dtype) -> Tensor:
        q = self.codes()
        if self.g_idx is None:
            w = dequantize(q, self.scales.t(), self.zeros.t(), self.group)
        else:
            gi = self.group_index()
            w = (q.float() - self.zeros.float()[gi].t()) * self.scales.float()[gi].t()
        return w.to(dtype)

    def nbytes(self) -> int:
        """Bytes as stored: packed codes, fp16 scales, zeros packed at `bits` bits, g_idx if any."""
        zeros = packed_size(self.out_features, self.scheme.bits) * self.n_groups * 4
        gi = 0 if self.g_idx is None else self.g_idx.numel() * 4
        return self.qweight.numel() * 4 + self.scales.numel() * 2 + zeros + gi

    def summary(self) -> PackedWeight:
        """What Format.prepare needs of a layer when the whole model is not in memory (streamed runs):
        scheme, shapes and g_idx as they are, the distinct zero points (1-D, so `(zeros == 0).any()`
        still answers), codes and scales as shape-only meta tensors."""
        return replace(self, qweight=torch.empty(self.qweight.shape, dtype=self.qweight.dtype, device="meta"),
                       scales=torch.empty(self.scales.shape, dtype=self.scales.dtype, device="meta"),
                       zeros=torch.unique(self.zeros.cpu()))

    def to(self, device) -> PackedWeight:
        return replace(
            self,
            qweight=self.qweight.to(device),
            scales=self.scales.to(device),
            zeros=self.zeros.to(device),
            g_idx=None if self.g_idx is None else self.g_idx.to(device),
        )


def default_g_idx(in_features: int, scheme: QuantScheme) -> Tensor:
    return torch.arange(in_features, dtype=torch.int32) // scheme.group_for(in_features)
