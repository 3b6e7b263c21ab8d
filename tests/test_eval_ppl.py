import copy
import math

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import real_model_fp32, tiny_llama, tokenizer  # noqa: F401  (fixtures)

from eval import ppl


def test_cut_windows_drops_tail_and_caps():
    ids = torch.arange(10)
    w = ppl.cut_windows(ids, 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # the tail (9) is dropped
    assert ppl.cut_windows(ids, 3, 2).shape == (2, 3)
    assert ppl.cut_windows(ids, 3, 99).shape == (3, 3)
    with pytest.raises(ValueError, match="lower --seqlen"):
        ppl.cut_windows(ids, 11)


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (2, 4), (7, 2)])
def test_shard_covers_every_window_once(n, world):
    parts = [ppl.shard(n, r, world) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_load_text_names(tmp_path):
    text, src = ppl.load_text("austen")
    assert src == "janeaustenr:prideprejudice"
    assert "\n\n" in text and "Elizabeth" in text
    f = tmp_path / "notes.txt"
    f.write_text("hello world", encoding="utf-8")
    assert ppl.load_text(str(f)) == ("hello world", f"file:{f}")
    assert ppl.dataset_key("austen") == "prideprejudice" and ppl.dataset_key(str(f)) == "notes.txt"
    with pytest.raises(ValueError, match="wikitext2, c4, austen"):
        ppl.load_text("no-such-dataset")


def test_clip_seqlen_to_context():
    model = tiny_llama()
    assert ppl.clip_seqlen(model, 1024) == 256 and ppl.clip_seqlen(model, 128) == 128


def test_perplexity_matches_direct_cross_entropy(tokenizer):  # noqa: F811
    model = tiny_llama()
    data = ppl.load_ppl_data("persuasion", tokenizer, 64, 3)
    r = ppl.perplexity(model, data, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(input_ids=data.windows).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data.windows[:, 1:].reshape(-1))
    assert r["tokens"] == 3 * 63 and r["seqlen"] == 64 and r["windows"] == 3
    assert math.isclose(r["ppl"], math.exp(ce.item()), rel_tol=1e-5)
    assert math.isclose(r["nll_sum"], sum(r["window_nll"]), rel_tol=1e-12)


def test_batch_size_does_not_change_the_result(tokenizer):  # noqa: F811
    model = tiny_llama()
    data = ppl.load_ppl_data("austen", tokenizer, 64, 5)
    results = [ppl.perplexity(model, data, batch_size=b, progress=False) for b in (1, 2, 5)]
    for r in results[1:]:
        assert r["nll_sum"] == results[0]["nll_sum"] and r["ppl"] == results[0]["ppl"]


def test_real_model_ppl_sane_and_perturbed_worse(real_model_fp32, tokenizer):  # noqa: F811
    data = ppl.load_ppl_data("austen", tokenizer, 256, 3)
    base = ppl.perplexity(real_model_fp32, data, batch_size=3, progress=False)
    assert 10 < base["ppl"] < 45, base["ppl"]  # ~22 for these windows; ~28 at 512 x 40
    noisy = copy.deepcopy(real_model_fp32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.3)
    worse = ppl.perplexity(noisy, data, batch_size=3, progress=False)
    assert worse["ppl"] > base["ppl"] * 1.05, (base["ppl"], worse["ppl"])


def test_c4_protocol_segments(tokenizer):  # noqa: F811
    docs = ["short text."] * 5 + [" ".join(f"word{i}" for i in range(400))] * 3
    a = ppl.c4_windows(tokenizer, docs, seqlen=32, n_windows=6, seed=0)
    b = ppl.c4_windows(tokenizer, docs, seqlen=32, n_windows=6, seed=0)
    assert a.shape == (6, 32) and torch.equal(a, b)  # seeded, only documents longer than seqlen
    assert not torch.equal(a, ppl.c4_windows(tokenizer, docs, seqlen=32, n_windows=6, seed=1))


def test_text_is_tokenized_once_per_tokenizer(tokenizer, monkeypatch):  # noqa: F811
    """A baseline and its checkpoints carry copies of one tokenizer: the novel is tokenized once, with the same ids
    as tokenizing it afresh; another tokenizer (one token added) gets its own ids."""
    text = "It is a truth universally acknowledged. " * 50
    first = ppl._tokenized(tokenizer, text)
    assert torch.equal(first, ppl.tokenize_text(tokenizer, text))
    monkeypatch.setattr(ppl, "tokenize_text", lambda *a: pytest.fail("tokenized again"))
    first[0] = -1  # callers get their own copy
    assert torch.equal(ppl._tokenized(copy.deepcopy(tokenizer), text)[1:], first[1:])
    assert ppl._tokenized(copy.deepcopy(tokenizer), text)[0] != -1
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["universally acknowledged"])
    monkeypatch.undo()
    assert ppl.tokenizer_fingerprint(other) != ppl.tokenizer_fingerprint(tokenizer)
    new_id = other.convert_tokens_to_ids("universally acknowledged")
    assert new_id in ppl._tokenized(other, text) and new_id not in first
