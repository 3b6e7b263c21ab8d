import logging

import pytest
import torch

from wq.algorithms.rtn import rtn_quantize
from wq.kernels import KERNELS, Kernel, force_kernel, matmul, reference_matmul, select
from wq.scheme import QuantScheme


@pytest.fixture
def pw():
    return rtn_quantize(torch.randn(32, 64), QuantScheme.parse("W4G32")).packed


def test_reference_matches_dequantized_linear(pw):
    x = torch.randn(3, 64)
    assert torch.allclose(reference_matmul(x, pw), x @ pw.dequantize().t(), atol=1e-5)


def test_capabilities_as_data_pick_best_and_log_why(pw, caplog, monkeypatch):
    calls = []
    fake = Kernel(name="fake4", fn=lambda x, p, b, s: calls.append(s) or reference_matmul(x, p, b),
                  bits=frozenset({4}), devices=frozenset({"cpu"}), max_m=4, priority=50,
                  prepare=lambda p: "repacked")
    big = Kernel(name="never", fn=None, bits=frozenset({2}), priority=99)
    monkeypatch.setitem(KERNELS._items, "fake4", fake)
    monkeypatch.setitem(KERNELS._items, "never", big)
    with caplog.at_level(logging.INFO, logger="wq.kernels.dispatch"):
        assert select(torch.randn(2, 64), pw).name == "fake4"
    assert "never: 4-bit unsupported" in caplog.text
    assert select(torch.randn(8, 64), pw).name == "reference"  # M=8 > max_m
    cache = {}
    matmul(torch.randn(1, 64), pw, None, cache)
    matmul(torch.randn(1, 64), pw, None, cache)
    assert calls == ["repacked", "repacked"] and list(cache) == ["fake4"]  # prepared once, cached


def test_forcing_a_kernel(pw, monkeypatch):
    monkeypatch.setenv("WQ_KERNEL", "reference")
    assert select(torch.randn(1, 64), pw).name == "reference"
    with pytest.raises(KeyError, match="Did you mean"):
        force_kernel("referense")
    force_kernel("reference")
    force_kernel(None)
