"""gptq_quantize on its own: real SmolLM2 weights and Hessians from real activations, no pipeline."""

from __future__ import annotations

import pytest
import torch

from wq.algorithms import ALGORITHMS
from wq.algorithms.gptq import gptq_quantize
from wq.algorithms.rtn import rtn_quantize
from wq.packing import PackedWeight
from wq.scheme import QuantScheme

SCHEMES = ["W4G-1", "W4G128", "W3G128", "W2G128"]


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T): the layer's mean squared output error (x2) on the calibration inputs."""
    E = w.float() - w_hat.float()  # [out, in]
    return float((E @ H * E).sum())


@pytest.fixture(scope="module")
def real_layer(real_model_dir):
    """q_proj (in 576: 4.5 groups of 128) of block 3, first 192 rows (speed), Hessian from 512 tokens of Emma."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wq.assets import load_book

    path = real_model_dir
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(tok(load_book("emma")[20000:40000])["input_ids"][:512]).unsqueeze(0)  # [1, 512]
    lin = model.model.layers[3].self_attn.q_proj
    seen = []

    def grab(module, args, out):
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        raise StopIteration  # the rest of the model is not needed

    h = lin.register_forward_hook(grab)
    with torch.no_grad(), pytest.raises(StopIteration):
        model(ids, use_cache=False)
    h.remove()
    x = seen[0].float()  # [512, 576]
    return lin.weight.detach()[:192].float().clone(), 2 * x.t() @ x / x.shape[0]


@pytest.mark.parametrize("scheme", SCHEMES + ["W3G128-sym", "W4G128-asym"])
def test_gptq_output_error_below_rtn(real_layer, scheme):
    w, H = real_layer
    s = QuantScheme.parse(scheme)
    rtn = output_error(w, rtn_quantize(w, s).packed.dequantize(), H)
    res = gptq_quantize(w, H, s)
    got = output_error(w, res.packed.dequantize(), H)
    assert got == pytest.approx(res.stats["loss"], rel=1e-3)
    assert got < 0.8 * rtn, (scheme, got, rtn)
    assert res.packed.g_idx is None and res.packed.scales.shape == (s.n_groups(576), w.shape[0])
    ref = output_error(w, torch.zeros_like(w), H)  # the relative errors the CLI's summary shows
    assert res.stats["output_error"] == pytest.approx((got / ref) ** 0.5, rel=1e-3)
    assert res.stats["rtn_output_error"] == pytest.approx((rtn / ref) ** 0.5, rel=1e-3)


@pytest.mark.parametrize("scheme", ["W4G128", "W2G128"])
def test_act_order_static_groups_keep_plain_g_idx(real_layer, scheme):
    """Static groups: codes un-permuted, group g = columns [gG, (g+1)G), so g_idx stays i // G (None)."""
    w, H = real_layer
    s = QuantScheme.parse(scheme)
    res = gptq_quantize(w, H, s, act_order=True)
    assert res.packed.g_idx is None
    rtn = output_error(w, rtn_quantize(w, s).packed.dequantize(), H)
    assert output_error(w, res.packed.dequantize(), H) < 0.8 * rtn
    # the codes re-packed from scratch give the same weights: nothing hides in a permutation
    pw = res.packed
    again = PackedWeight.from_codes(pw.codes(), pw.scales.t().float(), pw.zeros.t().float(), s)
    torch.testing.assert_close(again.dequantize(), pw.dequantize(), rtol=0, atol=0)


def test_act_order_dynamic_groups_record_g_idx(real_layer):
    w, H = real_layer
    s = QuantScheme.parse("W3G128")
    res = gptq_quantize(w, H, s, act_order=True, static_groups=False)
    gi = res.packed.g_idx
    assert gi is not None and gi.shape == (576,)
    assert torch.bincount(gi.long()).tolist() == [128, 128, 128, 128, 64]  # G columns per group, partial last
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    assert torch.equal(gi[perm].long(), torch.arange(576) // 128)  # groups follow act order
    assert output_error(w, res.packed.dequantize(), H) < output_error(w, rtn_quantize(w, s).packed.dequantize(), H)


def test_dead_columns_and_singular_hessian():
    torch.manual_seed(0)
    x = torch.randn(64, 96)
    x[:, 5] = 0  # an input that never fires
    x[:, 7] = x[:, 8]  # collinear inputs: H singular without damping
    H = 2 * x.t() @ x / 64
    w = torch.randn(32, 96)
    res = gptq_quantize(w, H, QuantScheme.parse("W4G32"), damp=0.0)
    w_hat = res.packed.dequantize()
    assert torch.isfinite(w_hat).all()
    assert torch.all(w_hat[:, 5] == 0)
    assert res.stats["damp"] > 0  # retried with damping after Cholesky failed


def test_registered_class_needs_hessian():
    cls = ALGORITHMS.get("gptq")
    assert cls.needs_calibration and cls.granularity == "layer"
    with pytest.raises(ValueError, match="Hessian"):
        cls().quantize_weight(torch.randn(8, 32), QuantScheme.parse("W4G32"))


@pytest.mark.parametrize("scheme", ["W4G128", "W3G64", "W2G32", "W4G-1"])
def test_batched_gptq_gives_the_same_codes(scheme):
    from wq.algorithms.gptq import gptq_quantize, gptq_quantize_many

    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(48, 200, generator=g) for _ in range(3)]
    xs = [torch.randn(300, 200, generator=g) * torch.rand(200, generator=g) * 3 for _ in range(3)]
    Hs = [2 * x.t() @ x / 300 for x in xs]
    s = QuantScheme.parse(scheme)
    for many, w, H in zip(gptq_quantize_many(ws, Hs, s), ws, Hs):
        one = gptq_quantize(w, H, s)
        assert torch.equal(many.packed.qweight, one.packed.qweight) and torch.equal(many.packed.scales, one.packed.scales)


def test_relative_output_error_on_a_row_sample_is_close():
    """Beyond `rows` output rows the summary's relative errors come from a fixed row sample (cost bound)."""
    from wq.algorithms.gptq import _objective

    g = torch.Generator().manual_seed(0)
    w = torch.randn(1200, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    H = 2 * x.t() @ x / 256
    s = QuantScheme.parse("W3G32")
    w_hat = rtn_quantize(w, s).packed.dequantize()
    exact, sampled = _objective(w, w_hat, H, s, False, rows=4096), _objective(w, w_hat, H, s, False, rows=100)
    assert exact["loss"] == sampled["loss"]  # the loss itself is always over every row
    assert exact["output_error"] == pytest.approx(exact["rtn_output_error"], rel=1e-5)  # w_hat is rtn here
    assert sampled["output_error"] == pytest.approx(exact["output_error"], rel=0.1)


@pytest.mark.parametrize("out_f", [300, 1200])
def test_stats_from_row_slices_equal_the_whole_weight(out_f):
    """gptq's summary numbers come from the packed result a slice of rows at a time: the same as from the whole
    dequantized weight (weight error, loss, sampled output errors)."""
    from wq.algorithms.gptq import _objective, _objective_packed

    g = torch.Generator().manual_seed(1)
    w = torch.randn(out_f, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    H = 2 * x.t() @ x / 256
    s = QuantScheme.parse("W4G32")
    packed = rtn_quantize(w, s).packed
    w_hat = packed.dequantize()
    error, stats = _objective_packed(w, packed, H, s, False, rows=100)
    whole = _objective(w, w_hat, H, s, False, rows=100)
    assert error == pytest.approx(float((w - w_hat).norm() / w.norm()), rel=1e-5)
    for k in ("loss", "output_error", "rtn_output_error"):
        assert stats[k] == pytest.approx(whole[k], rel=1e-4), k
    assert packed.rows(10, 20).dequantize().equal(w_hat[10:20])


@pytest.mark.parametrize("damp", [0.01, 0.0])  # 0.0: H is singular, the first factorization fails and H is restored
def test_consuming_the_hessian_gives_the_same_result_and_gives_it_back(tmp_path, damp):
    """consume_H factorizes H in its own storage (one [in, in] matrix instead of two): same codes, scales and
    stats as the copying path, and H holds its original values again afterwards (read back from the spill)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(80, 96, generator=g)
    x[:, 5] = 0  # dead input
    x[:, 7] = x[:, 8]  # collinear: singular without damping
    H = 2 * x.t() @ x / 80
    H_orig = H.clone()
    w = torch.randn(40, 96, generator=g)
    s = QuantScheme.parse("W3G32")
    ref = gptq_quantize(w, H, s, damp=damp)
    assert torch.equal(H, H_orig)  # the copying path never touches H
    got = gptq_quantize(w, H, s, damp=damp, consume_H=True, spill_dir=str(tmp_path))
    assert torch.equal(H, H_orig)
    assert torch.equal(got.packed.qweight, ref.packed.qweight) and torch.equal(got.packed.scales, ref.packed.scales)
    assert got.stats == ref.stats
    assert list(tmp_path.iterdir()) == []  # the spill file is unlinked: nothing left on disk


def test_in_place_inverse_factor_matches_the_definition():
    """_factor_in_place: U upper with U^T U = (H + damp*mean(diag) I)^-1, computed in H's storage."""
    from wq.algorithms.gptq import _factor_in_place

    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 64, generator=g, dtype=torch.float64)
    H64 = x.t() @ x / 300
    H = H64.float().clone()
    ptr = H.data_ptr()
    U = _factor_in_place(H, 0.01, None)
    assert U.data_ptr() == ptr  # no second matrix
    want = torch.linalg.inv(H64 + 0.01 * H64.diagonal().mean() * torch.eye(64, dtype=torch.float64))
    assert torch.allclose(U.double().triu(), U.double())
    assert torch.allclose(U.double().t() @ U.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
