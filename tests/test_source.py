"""The model argument: local paths checked, Hub ids failing fast offline, tokenizers only when text is needed."""

import time

import pytest
from conftest import make_tiny_llama

from wq.loading import source as S
from wq.quantize import main


@pytest.fixture
def tiny_dir(tmp_path):
    d = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(d)
    return d


def test_what_looks_like_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for spec in ("./m", "/abs/m", "~/m", "a/b/c", "out/typo", "with space/x", "C:\\m"):
        assert S.looks_like_path(spec), spec
    for spec in ("gpt2", "HuggingFaceTB/SmolLM2-135M", "org/name.v2"):
        assert not S.looks_like_path(spec), spec


def test_missing_local_paths_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "smollm2-w4g128").mkdir(parents=True)
    with pytest.raises(S.ModelSourceError, match="no such local directory"):
        S.resolve_source("./nope")
    with pytest.raises(S.ModelSourceError, match=r"no such local directory .*did you mean out/smollm2-w4g128"):
        S.resolve_source("out/smollm2-w4g12")  # a typo without ./ is not looked up on the Hub
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(S.ModelSourceError, match="is a file"):
        S.resolve_source("f.txt")


def test_local_dir_needs_config_and_weights(tiny_dir):
    src = S.resolve_source(str(tiny_dir))
    assert src.local and src.path == str(tiny_dir) and src.has_tokenizer is False
    (tiny_dir / "model.safetensors").rename(tiny_dir / "elsewhere.bin")
    with pytest.raises(S.ModelSourceError, match="no weights"):
        S.resolve_source(str(tiny_dir))
    (tiny_dir / "config.json").unlink()
    with pytest.raises(S.ModelSourceError, match="no config.json"):
        S.resolve_source(str(tiny_dir))


def test_hub_probe_is_one_quick_attempt(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    S.hub_unreachable.cache_clear()
    t = time.perf_counter()
    why = S.hub_unreachable(timeout=2.0)
    assert why and why.startswith("127.0.0.1:") and time.perf_counter() - t < 3
    S.hub_unreachable.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert S.hub_unreachable() == "HF_HUB_OFFLINE is set"
    S.hub_unreachable.cache_clear()


def test_unknown_hub_id_fails_at_once_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(S, "hub_unreachable", lambda: "huggingface.co: Name or service not known")
    t = time.perf_counter()
    assert main(["someone/made-up-model", "--scheme", "W4G128", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert [x for x in err.splitlines() if x.strip()] == [err.strip()] and "Hub cannot be reached" in err
    assert time.perf_counter() - t < 10 and not (tmp_path / "o").exists()


def test_a_reachable_hub_is_asked_once(monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    calls = []

    def missing(self, repo_id, **kw):
        calls.append(repo_id)
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants an HTTP response
        Exception.__init__(err, "404 Client Error: Repository Not Found")
        raise err

    monkeypatch.setattr(S, "hub_unreachable", lambda: None)
    monkeypatch.setattr(S, "_cached", lambda *a: False)
    monkeypatch.setattr(HfApi, "model_info", missing)
    with pytest.raises(S.ModelSourceError, match="no such model on the Hub"):
        S.resolve_source("someone/made-up-model")
    assert calls == ["someone/made-up-model"]
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, **kw: object())
    assert S.resolve_source("someone/real-model").path == "someone/real-model"


def test_tokenizer_only_when_text_is_needed(tiny_dir, tmp_path, capsys):
    assert main([str(tiny_dir), "--scheme", "W4G32", "--algo", "gptq", "-o", str(tmp_path / "g"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer files" in err and "--algo gptq calibrates on text" in err
    assert not (tmp_path / "g").exists()


def test_truncated_shard_fails_before_loading(tiny_dir, tmp_path, capsys):
    f = tiny_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert main([str(tiny_dir), "--scheme", "W4G32", "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    assert f"{f} is truncated" in capsys.readouterr().err
