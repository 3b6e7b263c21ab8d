"""The pipeline hands gptq a Hessian as scratch only when no Linear still to be quantized shares it."""

from __future__ import annotations

import copy

import torch

from tests.conftest import make_tiny_llama
from wq.algorithms.gptq import GPTQ
from wq.calib.pipeline import _quantize_layers
from wq.scheme import QuantScheme


def _block_inputs(model, n=3, t=24):
    captured = []
    h = model.model.layers[1].register_forward_pre_hook(lambda m, a, kw: captured.append((a, kw)), with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(0)))
    h.remove()
    (args, kw), = captured
    x = args[0] if args else kw.pop("hidden_states")
    return [x], [{k: v for k, v in kw.items() if k not in ("past_key_values", "use_cache")}]


def test_shared_hessians_are_never_overwritten_and_results_do_not_change(tmp_path):
    model = make_tiny_llama(hidden=64, inter=160, layers=2)
    block = model.model.layers[1]
    s = QuantScheme.parse("W4G32")
    names = {rel: s for rel, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    hidden, kwargs = _block_inputs(model)
    owned = {}

    class Rec(GPTQ):
        def quantize_weight(self, w, scheme, *, H=None, **context):
            owned[len(owned)] = (context["H_owned"], context["spill_dir"])
            return super().quantize_weight(w, scheme, H=H, **context)

    class Copying(GPTQ):
        consumes_hessian = False

    twin = copy.deepcopy(block)  # each run frees the weights it has quantized
    got, _ = _quantize_layers(block, names, Rec(), hidden, kwargs, torch.device("cpu"), spill_dir=str(tmp_path))
    ref, _ = _quantize_layers(twin, names, Copying(), hidden, kwargs, torch.device("cpu"))
    order = list(names)  # q k v o gate up down: q/k/v share one input, gate/up another
    want = {"q_proj": False, "k_proj": False, "v_proj": True, "o_proj": True, "gate_proj": False, "up_proj": True,
            "down_proj": True}
    assert {rel.rsplit(".", 1)[1]: owned[i][0] for i, rel in enumerate(order)} == want
    assert all(d == str(tmp_path) for _, d in owned.values())
    for rel in names:  # q and k were quantized from an H that v's factorization had not yet overwritten
        assert torch.equal(got[rel].packed.qweight, ref[rel].packed.qweight), rel
        assert got[rel].stats == ref[rel].stats, rel
    assert list(tmp_path.iterdir()) == []
