import json

import pytest
from eval_helpers import real_model_fp32, tiny_llama, tokenizer  # noqa: F401  (fixtures)

from eval import local_tasks, tasks


def test_presets_expand():
    assert len(tasks.expand_tasks(["leaderboard"])) == 10
    assert len(tasks.expand_tasks(["paper"])) == 6
    assert tasks.expand_tasks(["austen", "austen_lastword,piqa"]) == ["austen_lastword", "austen_continuation", "piqa"]


def test_lastword_docs_are_deterministic_and_well_formed():
    docs = local_tasks.lastword_docs(50)
    assert docs == local_tasks.lastword_docs(50) and len(docs) == 50
    for d in docs:
        assert d["book"] in local_tasks.LASTWORD_BOOKS
        assert d["target"].startswith(" ") and d["target"][1:].isalpha() and len(d["target"]) >= 4
        assert len(d["context"].split()) >= 29 and not d["context"].endswith(" ")


def test_continuation_docs_hold_the_true_sentence_once():
    docs = local_tasks.continuation_docs(60)
    assert docs == local_tasks.continuation_docs(60) and len(docs) == 60
    from wq.assets import load_book

    texts = {b: load_book(b) for b in local_tasks.CONTINUATION_BOOKS}
    labels = set()
    for d in docs:
        assert d["book"] in local_tasks.CONTINUATION_BOOKS and len(d["choices"]) == 4
        labels.add(d["label"])
        true = d["choices"][d["label"]]
        assert f"{d['context']} {true}" in texts[d["book"]]  # the true continuation follows the context
        assert len(set(d["choices"])) == 4
    assert len(labels) > 1  # the answer position varies


def test_local_task_yaml_has_absolute_data_paths(tmp_path):
    root = local_tasks.build_local_tasks(tmp_path / "t", n_docs=20)
    for name in local_tasks.LOCAL_TASKS:
        yaml_text = (root / f"{name}.yaml").read_text()
        path = json.loads(yaml_text.split("test: ", 1)[1].split("\n", 1)[0])
        assert path.startswith("/") and path.endswith(f"{name}.jsonl")
        assert len((root / f"{name}.jsonl").read_text().splitlines()) == 20


def test_add_bos_is_explicit(tokenizer):  # noqa: F811
    assert tasks.resolve_add_bos(tokenizer, None) is False  # SmolLM2's tokenizer adds no BOS
    assert tasks.resolve_add_bos(tokenizer, True) is True


def test_local_tasks_run_on_a_tiny_model(tokenizer):  # noqa: F811
    r = tasks.run_tasks(tiny_llama(), tokenizer, ["austen"], limit=6, n_local_docs=20)
    lw, cont = r["tasks"]["austen_lastword"], r["tasks"]["austen_continuation"]
    assert lw["n"] == 6 and cont["n"] == 6
    assert set(cont) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert lw["perplexity"] > 1000  # a random model knows nothing
    assert r["settings"]["add_bos"] is False and r["settings"]["limit"] == 6


@pytest.mark.slow  # the capability runs fast on a tiny model above; this checks the real model's quality
def test_real_model_beats_chance_on_local_tasks(real_model_fp32, tokenizer):  # noqa: F811
    r = tasks.run_tasks(real_model_fp32, tokenizer, ["austen"], limit=12, n_local_docs=20, batch_size=12)
    lw, cont = r["tasks"]["austen_lastword"], r["tasks"]["austen_continuation"]
    assert 0 <= cont["acc"] <= 1 and 0 <= cont["acc_norm"] <= 1 and cont["n"] == 12
    assert lw["acc"] > 0  # a real model gets some last words exactly right
    assert lw["perplexity"] < 2000


def test_unknown_task_fails_before_any_model_runs(monkeypatch):
    """A misspelt task is a ValueError with a suggestion up front, not lm-eval's KeyError after the perplexity
    runs (the lm-eval index is replaced by a small fake: indexing its ~14k YAMLs takes a minute here)."""

    class FakeManager:
        all_tasks = ["arc_easy", "hellaswag", "piqa", *local_tasks.LOCAL_TASKS]

    monkeypatch.setattr(tasks, "_task_manager", lambda include, include_defaults: FakeManager())
    assert tasks.check_tasks(["austen", "piqa"], n_local_docs=5) == [*local_tasks.LOCAL_TASKS, "piqa"]
    with pytest.raises(ValueError, match=r"'hellaswg' \(did you mean hellaswag\?\).*preset"):
        tasks.check_tasks(["piqa,hellaswg"], n_local_docs=5)
    from eval import run

    def must_not_load(*a, **k):
        raise AssertionError("a model was loaded before the task names were checked")

    monkeypatch.setattr(run.M, "resolve", must_not_load)
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run.evaluate("unused", tasks=["no_such_task"])


def test_quantize_cli_checks_eval_tasks_before_quantizing(monkeypatch, tmp_path, capsys):
    import wq.quantize as Q

    class FakeManager:
        all_tasks = ["hellaswag", *local_tasks.LOCAL_TASKS]

    monkeypatch.setattr(tasks, "_task_manager", lambda include, include_defaults: FakeManager())
    monkeypatch.setattr(Q, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("quantized first")))
    rc = Q.main(["--scheme", "W4G128", "-o", str(tmp_path / "out"), "--eval", "--eval-tasks", "hellaswg"])
    assert rc == 2 and not (tmp_path / "out").exists()
    assert "did you mean hellaswag" in capsys.readouterr().err
