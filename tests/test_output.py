"""The output location: checked before the model loads, replaced only once the new checkpoint is complete."""

import errno
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import make_tiny_llama

import wq
from wq.quantize import main
from wq.writing.output import OutputError, check_output, failure_note, is_checkpoint, resume_mismatch, swap_in


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny Llama saved as a plain HF directory, without tokenizer files (rtn needs none)."""
    d = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(d)
    return d


def _ckpt(path: Path, scheme: str = "W4G32") -> Path:
    model = make_tiny_llama()
    wq.quantize_model(model, scheme, progress=False)
    wq.save(model, path)
    return path


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------ check_output, no model


def test_working_dir_and_its_parents_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "canary.txt").write_text("mine")
    monkeypatch.chdir(work)
    for target in (".", "..", str(tmp_path), "./"):
        with pytest.raises(OutputError, match="current directory"):
            check_output(target, overwrite=True, overwrite_non_checkpoint=True)
    check_output("new-sub", overwrite=False)  # a new directory below is fine


def test_existing_directories(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output(empty)  # an empty directory is filled without --overwrite
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_text("x")
    with pytest.raises(OutputError, match="pass --overwrite"):
        check_output(other)
    with pytest.raises(OutputError, match="not a wq checkpoint .*a.jpg.*--overwrite-non-checkpoint"):
        check_output(other, overwrite=True)
    check_output(other, overwrite=True, overwrite_non_checkpoint=True)  # the user said so explicitly
    ckpt = _ckpt(tmp_path / "ckpt")
    assert is_checkpoint(ckpt)
    check_output(ckpt, overwrite=True)
    multi = tmp_path / "multi"  # several --format: OUT/<format>/wq.json, plus --eval's reports
    shutil.copytree(ckpt, multi / "gptq")
    (multi / "eval").mkdir()
    assert is_checkpoint(multi)
    (multi / "notes.txt").write_text("x")
    assert not is_checkpoint(multi)


def test_parent_file_unwritable_and_model_dir(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        check_output(tmp_path / "f" / "sub" / "out")
    with pytest.raises(OutputError, match="not a directory"):
        check_output(tmp_path / "f", overwrite=True)
    with pytest.raises(OutputError, match="model being read"):
        check_output(tmp_path / "m", overwrite=True, protect=(tmp_path / "m",))
    with pytest.raises(OutputError, match="model being read"):
        check_output(tmp_path, overwrite=True, overwrite_non_checkpoint=True, protect=(tmp_path / "m",))

    def read_only(*a, **k):  # root ignores permission bits, so simulate what a read-only mount says
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.mkdtemp", read_only)
    with pytest.raises(OutputError, match="cannot write in .*Read-only file system"):
        check_output(tmp_path / "new" / "out")


def test_free_space(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 0, 40 * 2**20))
    check_output(tmp_path / "out", needed_bytes=20 * 2**20)
    with pytest.raises(OutputError, match=r"not enough space .*107\.[0-9] MB needed.*40\.0 MB free"):
        check_output(tmp_path / "out", needed_bytes=83 * 2**20)
    ckpt = _ckpt(tmp_path / "ckpt")
    with pytest.raises(OutputError, match="both must fit"):
        check_output(ckpt, overwrite=True, needed_bytes=83 * 2**20)


# ------------------------------------------------------------------------------ swap_in


def test_swap_in_replaces_old_only_after_new_is_in(tmp_path, monkeypatch):
    old, new = tmp_path / "out", tmp_path / ".out.tmp"
    old.mkdir()
    (old / "wq.json").write_text("old")
    new.mkdir()
    (new / "wq.json").write_text("new")
    real_rename = os.rename
    calls = []

    def failing(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src) == new:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        swap_in(new, old)
    assert (old / "wq.json").read_text() == "old" and (new / "wq.json").read_text() == "new"
    assert _leftovers(tmp_path) == [".out.tmp"]  # the aside copy went back
    monkeypatch.setattr(os, "rename", real_rename)
    swap_in(new, old)
    assert (old / "wq.json").read_text() == "new" and _leftovers(tmp_path) == []


def test_save_failure_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    out = _ckpt(tmp_path / "out", "W4G32")
    before = (out / "wq.json").read_text()
    model = make_tiny_llama()
    wq.quantize_model(model, "W8G-1", progress=False)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("wq.writing.shards._append", full_disk)  # the shard is joined on disk
    with pytest.raises(OSError, match="No space"):
        wq.save(model, out, overwrite=True)
    assert (out / "wq.json").read_text() == before and _leftovers(tmp_path) == []
    monkeypatch.undo()
    wq.save(model, out, overwrite=True)
    assert json.loads((out / "wq.json").read_text())["scheme"] == "W8G-1" and _leftovers(tmp_path) == []


def test_failure_note_and_resume_mismatch(tmp_path):
    out = tmp_path / "out"
    assert failure_note(out).startswith(f"nothing was written to {out}")
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "state.json").write_text("{}")
    (partial / "block_0000.safetensors").write_bytes(b"\0" * 3000)
    assert "--resume" not in failure_note(out, resumable=False)
    note = failure_note(out)
    assert str(partial) in note and "KB" in note and "--resume" in note
    err = resume_mismatch(partial, {"algo": "gptq", "settings": {"damp": 0.01}, "samples": [128, 2048]},
                          {"algo": "gptq", "settings": {"damp": 0.1}, "samples": [64, 2048]})
    assert "--damp (0.01 then, 0.1 now)" in str(err) and "--nsamples/--seqlen" in str(err)
    assert "samples_sum" not in str(err) and isinstance(err, ValueError)


# ------------------------------------------------------------------------------ the CLI


def test_cli_refuses_cwd_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "canary.txt").write_text("mine")
    monkeypatch.setattr("wq.quantize.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["--scheme", "W4G128", "-o", ".", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "current directory" in err
    assert (tmp_path / "canary.txt").read_text() == "mine"


def test_cli_overwrite_swaps_and_late_failure_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main([str(tiny_dir), "--scheme", "W4G32", "-o", str(out), "--no-progress"]) == 0
    assert not (out / "tokenizer.json").exists()  # the model has no tokenizer; rtn needs none
    assert main([str(tiny_dir), "--scheme", "W8G-1", "-o", str(out), "--no-progress", "--overwrite"]) == 0
    assert json.loads((out / "wq.json").read_text())["scheme"] == "W8G-1"
    capsys.readouterr()

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("wq.writing.shards._append", full_disk)  # the shard is joined on disk
    assert main([str(tiny_dir), "--scheme", "W4G32", "-o", str(out), "--no-progress", "--overwrite"]) == 1
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "No space left on device" in errors[0] and f"{out} is unchanged" in errors[0]
    assert json.loads((out / "wq.json").read_text())["scheme"] == "W8G-1"
    assert _leftovers(tmp_path) == []
