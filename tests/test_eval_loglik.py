"""Shared-context loglikelihood scoring gives lm-eval's HFLM numbers, with fewer tokens through the model."""

import pytest
import torch
from eval_helpers import tiny_llama, tokenizer  # noqa: F401  (fixtures)

from eval import loglik
from eval.tasks import _make_lm


def _requests(tok):
    docs = [("Elizabeth looked at him and", [" smiled.", " wept bitterly.", " left", " said nothing at all to Jane."]),
            ("It is a truth universally acknowledged, that a single man", [" in possession", " of a good fortune"]),
            ("Mr. Darcy", [" bowed."]), ("Mr. Darcy", [" bowed."]),  # a duplicate request
            ("She", [" was"])]
    return [(ctx, cont) for ctx, conts in docs for cont in conts]


class _Req:
    def __init__(self, args):
        self.args = args


def test_pack_layout_and_mask():
    reqs = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([1, 2, 3], [7, 8, 9]), ([5], [6]), ([1] * 9, [2, 3])]
    rows, rest = loglik.pack(reqs, max_length=8)
    assert rest == [4]  # 9 + 2 > 8 + 1: left to HFLM's truncation
    shared = next(r for r in rows if len(r.members) == 3)
    assert shared.tokens == [1, 2, 3, 4, 7, 8] and shared.positions == [0, 1, 2, 3, 3, 4]
    assert [m[2] for m in shared.members] == [[2, 3], [2], [2, 4, 5]]
    m = loglik.row_mask(shared, 7)
    assert m[4, :3].all() and not m[4, 3] and m[4, 4] and not m[3, 4]  # choice 3 sees the context, not choice 1
    assert m[6].tolist() == [False] * 6 + [True]  # padding sees itself only
    assert [len(b) for b in loglik.batches(rows, budget=12)] == [2]  # 2 rows x 6 tokens
    assert [len(b) for b in loglik.batches(rows, budget=11)] == [1, 1]


@pytest.mark.parametrize("bos", [False, True])
def test_same_numbers_as_hflm(tokenizer, bos):  # noqa: F811
    model = tiny_llama(seed=1)
    reqs = [_Req(a) for a in _requests(tokenizer)]
    fast = _make_lm(model, tokenizer, batch_size=4, add_bos=bos, max_length=None, rank=0, world_size=1)
    plain = _make_lm(model, tokenizer, batch_size=4, add_bos=bos, max_length=None, rank=0, world_size=1,
                     shared_contexts=False)
    got = fast.loglikelihood(reqs, disable_tqdm=True)
    ref = plain.loglikelihood(reqs, disable_tqdm=True)
    assert not getattr(fast, "_plain_only", False)  # the packed path ran (its self-check passed)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(got, ref, strict=True):
        assert lp == pytest.approx(lp_ref, rel=1e-5, abs=1e-4) and greedy == greedy_ref


def test_fewer_tokens_and_fallback(tokenizer, monkeypatch):  # noqa: F811
    model = tiny_llama(seed=1)
    seen = []
    forward = model.forward

    def counting(*a, **kw):
        seen.append(int((kw.get("input_ids") if "input_ids" in kw else a[0]).numel()))
        return forward(*a, **kw)

    monkeypatch.setattr(model, "forward", counting)
    lm = _make_lm(model, tokenizer, batch_size=4, add_bos=False, max_length=None, rank=0, world_size=1)
    pairs = [lm._encode_pair(c, k) for c, k in _requests(tokenizer)]
    res, rest = loglik.loglikelihood(model, pairs, max_length=256, check=False)
    assert not rest and len(res) == len(pairs)
    naive = sum(len(c) + len(k) - 1 for c, k in pairs)  # HFLM: one sequence per request
    rows, _ = loglik.pack(pairs, 256)
    assert sum(len(r) for r in rows) < 0.7 * naive and len(rows) == 4  # the duplicate shares its twin's row
    assert len(seen) == 1  # one forward for the whole (small) set

    def alibi_like(*a, **kw):  # a model that ignores position ids and custom masks
        kw.pop("position_ids", None)
        kw.pop("attention_mask", None)
        return forward(*a, **kw)

    monkeypatch.setattr(model, "forward", alibi_like)
    assert loglik.loglikelihood(model, pairs, max_length=256) is None  # caught: the caller scores plainly
    torch.manual_seed(0)
