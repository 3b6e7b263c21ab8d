"""wq.algorithms.kept_codes: the best iterate's codes come back exactly, held at the scheme's bit width."""

from __future__ import annotations

import pytest
import torch

from wq.algorithms.kept_codes import KeptCodes


@pytest.mark.parametrize("bits,G,per_weight", [(2, 128, 0.25), (3, 128, 0.5), (4, 128, 0.5), (4, 576, 0.5),
                                               (8, 64, 1.0), (5, 128, 1.0), (4, 101, 51 / 101), (2, 30, 8 / 30)])
def test_codes_round_trip_at_their_bits(bits, G, per_weight):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (96, 3, G), generator=g, dtype=torch.uint8)
    kept = KeptCodes(q, bits)
    assert torch.equal(kept.rows(), q)
    assert torch.equal(kept.rows(17, 80), q[17:80])
    assert kept.nbytes() / q.numel() == pytest.approx(per_weight)  # a group's last byte may be part padding
    q2 = torch.randint(0, 2**bits, q.shape, generator=g, dtype=torch.uint8)
    storage = kept.words.data_ptr()
    kept.copy_(q2)
    assert torch.equal(kept.rows(), q2) and kept.words.data_ptr() == storage
