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


def test_asym_beats_sym_at_low_bits_and_mse_search_helps(real_weights):
    w = real_weights[1]
    assert _error(w, "W2G128-asym") < _error(w, "W2G128-sym")
    assert _error(w, "W3G128", mse=True) < _error(w, "W3G128")


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
