"""wq.calib.microbatch: the Hessian pass replays a batch one sample at a time, with the same sums."""

from __future__ import annotations

import torch

from wq.calib import pipeline as P
from wq.calib.microbatch import per_sample
from wq.scheme import QuantScheme


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _hessians(model, ids: torch.Tensor, batch: int, seen: list) -> dict:
    cpu = torch.device("cpu")
    hidden, kwargs = P.capture_block_inputs(model, model.model.layers, "model.layers", list(ids.split(batch)), cpu, cpu)
    block = model.model.layers[0]
    names = {n: QuantScheme.parse("W4G32") for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    h = block.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    try:
        with torch.no_grad():
            H, count, _ = P._accumulate(block, names, hidden, kwargs, cpu)
    finally:
        h.remove()
    return {k: (v, count[k]) for k, v in H.items()}


def test_hessians_of_a_batch_equal_those_of_its_samples_bit_for_bit():
    model = _tiny_llama()
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(3))  # [n, L]
    seen_batched, seen_single = [], []
    batched = _hessians(model, ids, 3, seen_batched)  # 2 batches of 3 samples
    single = _hessians(model, ids, 1, seen_single)  # the same 6 samples captured one by one
    assert seen_batched == seen_single == [1] * 6  # the block only ever ran one sample at a time
    assert batched.keys() == single.keys() and len(batched) == 4  # q (k, v share it), o, gate (up), down
    for k in batched:
        assert batched[k][1] == single[k][1] == 6 * 24
        assert torch.equal(batched[k][0], single[k][0]), k
    # and they are the Hessians of the batch forward, up to the order of addition
    cpu = torch.device("cpu")
    hidden, kwargs = P.capture_block_inputs(model, model.model.layers, "model.layers", [ids], cpu, cpu)
    xs = []
    hk = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, 160)))
    with torch.no_grad():
        model.model.layers[0](hidden[0], **kwargs[0])
    hk.remove()
    ref = 2 / xs[0].shape[0] * xs[0].t() @ xs[0]
    torch.testing.assert_close(batched["mlp.down_proj"][0], ref, rtol=1e-5, atol=1e-6)


def test_kwargs_are_sliced_only_where_they_are_per_sample():
    b, t = 3, 5
    hidden = torch.randn(b, t, 8)
    mask = torch.randn(b, 1, t, t)
    cos, sin = torch.randn(1, t, 4), torch.randn(1, t, 4)
    kw = {"attention_mask": mask, "position_embeddings": (cos, sin), "cache_position": torch.arange(t),
          "position_ids": torch.arange(t).expand(b, t), "output_attentions": False, "extra": None}
    parts = per_sample(hidden, kw)
    assert len(parts) == b
    for i, (h, k) in enumerate(parts):
        assert torch.equal(h, hidden[i:i + 1])
        assert torch.equal(k["attention_mask"], mask[i:i + 1])
        assert k["position_embeddings"][0] is cos and k["position_embeddings"][1] is sin  # broadcast: kept
        assert torch.equal(k["cache_position"], torch.arange(t)) and k["output_attentions"] is False
        assert k["position_ids"].shape == (1, t)


def test_a_batch_that_cannot_be_split_safely_is_replayed_whole():
    hidden = torch.randn(2, 4, 8)
    alibi = torch.randn(2 * 4, 1, 4)  # Bloom: [B * heads, 1, T], per sample but not along dim 0 alone
    assert per_sample(hidden, {"alibi": alibi}) == [(hidden, {"alibi": alibi})]
    opaque = object()  # e.g. a flex-attention BlockMask
    assert len(per_sample(hidden, {"attention_mask": opaque})) == 1
    assert len(per_sample(hidden[:1], {"attention_mask": torch.randn(1, 1, 4, 4)})) == 1
