"""wq.calib.upcast: fp32 math on bf16-stored Linears equals an fp32 copy of the block, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import wq
from tests.conftest import make_tiny_llama
from wq.calib import upcast
from wq.calib.upcast import fp32_linears
from wq.nn import QuantLinear


@pytest.mark.parametrize("chunk", [1 << 21, 1])  # one conversion per Linear; 64 output rows at a time
def test_bf16_linears_compute_like_an_fp32_block(chunk, monkeypatch):
    monkeypatch.setattr(upcast, "_CHUNK", chunk)
    model = make_tiny_llama(hidden=64, inter=160, layers=1).to(torch.bfloat16)
    block = model.model.layers[0]
    ref = copy.deepcopy(block).float()
    lins = [m for m in block.modules() if isinstance(m, nn.Linear)]
    for m in block.modules():  # everything but the Linears' weights in fp32, as the pipeline does
        for name, p in m.named_parameters(recurse=False):
            if not (m in lins and name == "weight"):
                p.data = p.data.float()
    x = torch.randn(2, 16, 64)
    pos = torch.arange(16)[None].expand(2, -1)
    emb = model.model.rotary_emb(x, pos)
    seen = []
    hook = lins[0].register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    with torch.no_grad(), fp32_linears(lins):
        got = block(x, position_embeddings=emb, position_ids=pos)
    hook.remove()
    want = ref(x, position_embeddings=emb, position_ids=pos)
    got, want = (t[0] if isinstance(t, tuple) else t for t in (got, want))
    assert torch.equal(got, want)
    assert seen == [torch.float32]  # the hooks (Hessian accumulation) still run, on fp32 outputs
    assert all("forward" not in vars(m) for m in lins) and all(m.weight.dtype == torch.bfloat16 for m in lins)


def test_gptq_on_a_bf16_model_equals_gptq_on_its_fp32_copy():
    """The pipeline keeps a bf16 model's Linear weights in bf16 during calibration (half the block's memory):
    the Hessians, and so the codes, are those of the fp32 block it used to hold."""
    bf16 = make_tiny_llama(hidden=64, inter=160, layers=2).to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))
    for m in (bf16, fp32):
        wq.quantize_model(m, "W4G32", algo="gptq", calib=ids, progress=False, nsamples=8, seqlen=32, batch_size=4)
    qs = {n: m for n, m in bf16.named_modules() if isinstance(m, QuantLinear)}
    assert len(qs) == 14
    for n, q in qs.items():
        r = fp32.get_submodule(n)
        assert torch.equal(q.qweight, r.qweight) and torch.equal(q.scales, r.scales), n


def test_row_chunks_cover_the_rows_and_none_is_narrow():
    from wq.primitives import row_chunks

    for out_f, in_f, elements in [(200, 64, 1), (5632, 2048, 1 << 21), (100, 64, 1), (2048, 53248, 1 << 21), (64, 8, 1)]:
        chunks = row_chunks(out_f, in_f, elements)
        assert chunks[0][0] == 0 and chunks[-1][1] == out_f
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert all(r1 - r0 >= min(64, out_f) for r0, r1 in chunks), chunks
    assert row_chunks(200, 64, 1) == [(0, 64), (64, 128), (128, 200)]  # the 8-row remainder joins the chunk before it
