import json

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


def test_real_model_beats_chance_on_local_tasks(real_model_fp32, tokenizer):  # noqa: F811
    r = tasks.run_tasks(real_model_fp32, tokenizer, ["austen"], limit=12, n_local_docs=20, batch_size=12)
    lw, cont = r["tasks"]["austen_lastword"], r["tasks"]["austen_continuation"]
    assert 0 <= cont["acc"] <= 1 and 0 <= cont["acc_norm"] <= 1 and cont["n"] == 12
    assert lw["acc"] > 0  # a real model gets some last words exactly right
    assert lw["perplexity"] < 2000
