"""python -m wq.generate on a quantized checkpoint: compact CPU layers, tokens/s printed."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

import wq
import wq.io
from wq import generate
from wq.nn import QuantLinear

pytestmark = pytest.mark.kernels  # the CPU kernels, as a user gets them


def test_generate_runs_compact_checkpoint(tmp_path, real_tokenizer, capsys, monkeypatch):
    model = make_tiny_llama(vocab=len(real_tokenizer))
    wq.quantize_model(model, "W4G32", progress=False)
    wq.save(model, tmp_path / "q", tokenizer=real_tokenizer)
    loaded = []
    real_load = wq.io.load

    def spy(*a, **kw):  # generate imports wq.io.load when it runs
        loaded.append(real_load(*a, **kw))
        return loaded[-1]

    monkeypatch.setattr(wq.io, "load", spy)
    med = generate.main([str(tmp_path / "q"), "--baseline", "none", "--tokens", "3", "--reps", "1", "--prompt", "Hi"])
    (name, tps), = med.items()
    assert name.startswith("W4G32") and tps > 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "load average" in out and "OMP_WAIT_POLICY=PASSIVE" in out
    assert "note: lm_head" in out  # a 49152-word dense head is most of this tiny model
    qls = [m for m in loaded[0].modules() if isinstance(m, QuantLinear)]
    assert qls and all(m.qweight.is_meta for m in qls)  # compact: only the kernel layout is kept
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3]])
        assert torch.equal(loaded[0](ids).logits, real_load(tmp_path / "q")(ids).logits)


def test_lm_head_note_only_for_a_large_dense_head():
    model = make_tiny_llama(vocab=4096)
    wq.quantize_model(model, "W4G32", progress=False)
    assert "lm_head" in generate.lm_head_note(model)
    assert generate.lm_head_note(model, min_share=0.99) is None  # a small share: no note
    quantized_head = make_tiny_llama(vocab=4096)
    wq.quantize_model(quantized_head, "W4G32", override={"lm_head": "W8G32"}, progress=False)
    assert isinstance(quantized_head.get_output_embeddings(), QuantLinear)
    assert generate.lm_head_note(quantized_head) is None


def test_threads_follow_the_load(monkeypatch):
    from wq import threads

    assert threads.pick_threads(2, 0.1) == 2 and threads.pick_threads(2, 1.2) == 1 and threads.pick_threads(2, 6) == 1
    assert threads.pick_threads(16, 4.0) == 12 and threads.pick_threads(4, None) == 4
    monkeypatch.setattr(threads, "load_average", lambda: 5.5)
    monkeypatch.setattr(threads, "cpu_count", lambda: 2)
    assert generate.choose_threads("auto") == (1, "auto: 2 CPUs, load average 5.50")
    assert generate.choose_threads("3") == (3, "--threads")
    env = {}
    threads.configure_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not threads.configure_openmp(env) and env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert generate.cli([str(tmp_path / "nope"), "--baseline", "none"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_help_names_the_module_and_defaults(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m wq.generate") and "(default: 64)" in out and "(default: auto)" in out
