import pytest
import torch

from wq import primitives as P
from wq.packing import PackedWeight, pack, packed_size, unpack
from wq.scheme import QuantScheme


@pytest.mark.parametrize("scheme", ["W4G128", "W3G32-asym", "W2G64"])
def test_dequantize_in_row_chunks_equals_one_piece(scheme, monkeypatch):
    import wq.packing as packing

    s = QuantScheme.parse(scheme)
    w = torch.randn(200, 256, generator=torch.Generator().manual_seed(2))  # [out, in]
    scale, zero = P.minmax_qparams(w, s)
    q = P.quantize(w, scale, zero, s)
    pw = PackedWeight.from_codes(q, scale, zero, s)
    pw_g = PackedWeight(pw.qweight, pw.scales, pw.zeros, s, 256, 200, g_idx=torch.arange(256, dtype=torch.int32) // s.group_size)
    whole = [pw.dequantize(), pw_g.dequantize(torch.bfloat16)]
    monkeypatch.setattr(packing, "_DEQUANT_CHUNK", 64 * 256)  # 64-row chunks: 64, 64, 72
    assert packing.row_chunks(200, 256, packing._DEQUANT_CHUNK) == [(0, 64), (64, 128), (128, 200)]
    chunked = [pw.dequantize(), pw_g.dequantize(torch.bfloat16)]
    assert chunked[1].dtype == torch.bfloat16
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    assert torch.equal(chunked[0], P.dequantize(q, scale, zero, s.group_for(256)))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 96, 100, 576])
def test_pack_round_trip_any_length(bits, n):
    g = torch.Generator().manual_seed(n * 10 + bits)
    q = torch.randint(0, 2**bits, (n, 5), generator=g)
    p = pack(q, bits, dim=0)
    assert p.dtype == torch.int32 and p.shape == (packed_size(n, bits), 5)
    assert torch.equal(unpack(p, bits, n, dim=0), q.to(torch.int32))
    p1 = pack(q.t(), bits, dim=1)  # along columns, as GPTQ's qzeros
    assert torch.equal(unpack(p1, bits, n, dim=1), q.t().to(torch.int32))


def test_three_bit_is_a_contiguous_lsb_first_stream():
    q = torch.arange(32) % 8
    words = pack(q[:, None], 3, dim=0)[:, 0].tolist()
    stream = "".join(format(int(v), "03b")[::-1] for v in q)  # bit i of the stream = bit i of the words
    expected = [int(stream[32 * i:32 * (i + 1)][::-1], 2) for i in range(3)]
    assert [w & 0xFFFFFFFF for w in words] == expected
    # value 10 straddles words 0 and 1: low 2 bits at the top of word 0, high bit at the bottom of word 1
    assert (words[0] & 0xFFFFFFFF) >> 30 == (10 % 8) & 0b11
    assert words[1] & 1 == ((10 % 8) >> 2) & 1


def test_four_bit_matches_nibble_layout():
    q = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8] * 4)
    word = pack(q[:, None], 4, dim=0)[0, 0].item() & 0xFFFFFFFF
    assert word == 0x87654321


def test_extreme_codes_survive_sign_bit():
    q = torch.full((64, 3), 15)
    assert torch.equal(unpack(pack(q, 4), 4, 64), q.int())


@pytest.mark.parametrize("scheme", ["W4G128", "W3G128", "W2G128", "W8G-1", "W4G-1", "W4G32-asym"])
@pytest.mark.parametrize("shape", [(48, 576), (17, 100), (8, 33)])
def test_packed_weight_dequantizes_exactly(scheme, shape):
    s = QuantScheme.parse(scheme)
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    scale, zero = P.minmax_qparams(w, s)
    q = P.quantize(w, scale, zero, s)
    pw = PackedWeight.from_codes(q, scale, zero, s)
    assert torch.equal(pw.codes(), q)
    assert torch.equal(pw.dequantize(), P.dequantize(q, scale, zero, s.group_for(shape[1])))
    assert pw.scales.shape == (s.n_groups(shape[1]), shape[0]) and pw.scales.dtype == torch.float16


def test_g_idx_path_matches_default():
    s = QuantScheme.parse("W4G32")
    w = torch.randn(16, 96)
    scale, zero = P.minmax_qparams(w, s)
    q = P.quantize(w, scale, zero, s)
    pw = PackedWeight.from_codes(q, scale, zero, s)
    pw_g = PackedWeight(pw.qweight, pw.scales, pw.zeros, s, 96, 16, g_idx=torch.arange(96, dtype=torch.int32) // 32)
    assert torch.equal(pw.dequantize(), pw_g.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_in_slices_equals_pack_at_once(bits, monkeypatch):
    """Large code matrices are packed a slice of columns at a time (bounded int64 temporaries): same words."""
    import wq.packing as packing

    q = torch.randint(0, 2**bits, (256, 40), dtype=torch.int32)
    whole = packing.pack(q, bits, dim=0)
    monkeypatch.setattr(packing, "_PACK_AT_ONCE", 256 * 3)  # 3 columns per slice, the last one short
    assert torch.equal(packing.pack(q, bits, dim=0), whole)
    assert torch.equal(packing.pack(q.t(), bits, dim=1), whole.t())


@pytest.mark.parametrize("scheme", ["W4G128", "W3G128", "W2G32-asym", "W8"])
def test_rtn_in_row_slices_equals_rtn_at_once(scheme):
    from wq.algorithms.rtn import rtn_quantize

    w = torch.randn(70, 256, dtype=torch.bfloat16)
    s = QuantScheme.parse(scheme)
    a, b = rtn_quantize(w, s, max_elements=256 * 8), rtn_quantize(w, s, max_elements=10**9)  # 9 slices vs 1
    for k in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(a.packed, k), getattr(b.packed, k)), k
    assert abs(a.error - b.error) < 1e-6 and a.error > 0
