import pytest
import torch

from wq import primitives as P
from wq.algorithms import ALGORITHMS
from wq.algorithms.rtn import rtn_quantize
from wq.scheme import QuantScheme


def _error(w, scheme, **kw):
    return rtn_quantize(w, QuantScheme.parse(scheme), **kw).error


@pytest.fixture(scope="module")
def real_weights(_real_model_pristine):
    layer = _real_model_pristine.model.layers[3]
    return [layer.self_attn.q_proj.weight.float(), layer.mlp.down_proj.weight.float(), layer.mlp.up_proj.weight.float()]


def test_error_ordering_on_real_weights(real_weights):
    for w in real_weights:
        e = {s: _error(w, s) for s in ["W8G-1", "W4G128", "W4G-1", "W3G128", "W2G128"]}
        assert e["W8G-1"] < e["W4G128"] < e["W4G-1"], e
        assert e["W4G128"] < e["W3G128"] < e["W2G128"], e
        assert e["W8G-1"] < 0.02 and e["W2G128"] < 1.0


def test_mse_search_helps(real_weights):
    w = real_weights[1]
    assert _error(w, "W3G128", mse=True) < _error(w, "W3G128")
    assert _error(w, "W4G128", mse=True) < _error(w, "W4G128")


@pytest.mark.parametrize("scheme", ["W4G128", "W4G-1", "W8"])
def test_sym_scale_uses_the_full_lower_half(real_weights, scheme):
    """Full-range symmetric scales: +-amax / 2^(b-1), signed so that the group's extreme lands on code 0
    exactly; on real weights that beats the classic 2 * amax / maxq."""
    s = QuantScheme.parse(scheme)
    for w in real_weights:
        scale, zero = P.minmax_qparams(w, s)
        g = P.group_view(w, s.group_for(w.shape[1]))
        wmin, wmax = g.amin(2).clamp(max=0), g.amax(2).clamp(min=0)
        amax = torch.maximum(-wmin, wmax)
        neg = -wmin >= wmax
        assert neg.any() and (~neg).any()
        torch.testing.assert_close(scale[neg], P.round_scale(amax / 2 ** (s.bits - 1))[neg])
        torch.testing.assert_close(scale[~neg], P.round_scale(-amax / 2 ** (s.bits - 1))[~neg])
        codes = P.quantize(w, scale, zero, s)  # the extreme of every group sits on code 0
        extreme = torch.where(neg, g.argmin(2), g.argmax(2))  # [out, ng]
        assert (P.group_view(codes.float(), s.group_for(w.shape[1])).gather(2, extreme[..., None]) == 0).all()
        classic = P.round_scale(2 * amax / s.maxq)
        err = (P.fake_quantize(w, scale, zero, s) - w).pow(2).sum()
        err_classic = (P.fake_quantize(w, classic, zero, s) - w).pow(2).sum()
        assert err < err_classic * (0.95 if s.bits == 4 else 1.0), (float(err), float(err_classic))


def test_rtn_codes_are_nearest():
    s = QuantScheme.parse("W4G32-asym")
    w = torch.randn(4, 64)
    r = rtn_quantize(w, s)
    scale = r.packed.scales.float().t()
    zero = r.packed.zeros.float().t()
    q = r.packed.codes()
    # every code is within half a step of w/scale + zero (unless clamped at the range ends)
    target = w / P.expand_groups(scale, 32, 64) + P.expand_groups(zero, 32, 64)
    inside = (target > 0) & (target < s.maxq)
    assert ((q.float() - target).abs()[inside] <= 0.5 + 1e-4).all()


def test_all_zero_group_is_exact():
    w = torch.zeros(4, 128)
    w[0, :64] = torch.randn(64)
    r = rtn_quantize(w, QuantScheme.parse("W4G64"))
    assert torch.equal(r.packed.dequantize()[1:], w[1:])


def test_registry_names_and_did_you_mean():
    assert "rtn" in ALGORITHMS
    with pytest.raises(KeyError, match="Did you mean 'rtn'"):
        ALGORITHMS.get("rtm")
