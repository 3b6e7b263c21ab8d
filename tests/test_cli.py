"""The CLI end to end on the real bundled model, and its bad-input errors."""

import json
import subprocess
import sys

import pytest
import torch

import wq
from wq.quantize import main


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, "-m", "wq.quantize", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ["--scheme", "--algo", "--output", "--format", "--skip", "--override", "--overwrite", "--calib",
                 "--nsamples", "--seqlen", "--eval", "--recipe", "--device"]:
        assert flag in out.stdout


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--scheme", "W5G128", "-o", "X"], "W<bits>G<group>"),
        (["--scheme", "W4G128", "--algo", "rtm", "-o", "X"], "Did you mean 'rtn'"),
        (["--scheme", "W4G128"], "-o OUT"),
        (["./does-not-exist", "--scheme", "W4G128", "-o", "X"], "no such local directory"),
        (["--override", "down_proj", "-o", "X"], "PATTERN=SCHEME"),
        (["--format", "gtpq", "-o", "X"], "Did you mean 'gptq'"),
        (["--algo", "recon", "--init", "gtpq", "-o", "X"], "--init gtpq: choose one of rtn, gptq, autoround"),
        (["--algo", "awq", "--quantizer", "hqq", "-o", "X"], "--quantizer hqq"),
        (["--bits-budget", "3", "--bits-candidates", "W5G128", "-o", "X"], "W<bits>G<group>"),
        (["--scheme", "BF16", "--rotate", "-o", "X"], "--rotate with BF16: a float cast takes neither"),
        (["--algo", "gptq", "--calib", "corpus.txt", "-o", "X"], "--calib corpus.txt: no such file"),
    ],
)
def test_bad_input_errors(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "X").exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")  # an empty directory is filled without --overwrite
    assert main(["--scheme", "W4G128", "-o", str(tmp_path / "o")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_end_to_end_default_model(tmp_path, real_tokenizer, capsys):
    out = tmp_path / "w4"
    assert main(["--scheme", "W4G128", "-o", str(out), "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "layers quantized           : 210" in summary and "lm_head" in summary
    meta = json.loads((out / "wq.json").read_text())
    assert meta["recipe"]["scheme"] == "W4G128" and meta["algo"] == "rtn"
    assert meta["size_bytes"]["after"] < meta["size_bytes"]["before"] / 2
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4
    model = wq.load(out)
    ids = real_tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits.float()).all()


def test_eval_flag_on_a_tiny_model(tmp_path, capsys, monkeypatch):
    """--eval: the checkpoint's perplexity next to its source model's, report files and wq.json "eval"."""
    from eval_helpers import _tiny_dir

    monkeypatch.setenv("WQ_EVAL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "w3"
    argv = [_tiny_dir(), "--scheme", "W3G32", "-o", str(out), "--no-progress", "--eval", "--eval-seqlen", "64",
            "--eval-windows", "3", "--eval-ppl", "austen"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ppl (seqlen 64): baseline" in printed and "eval report:" in printed
    meta = json.loads((out / "wq.json").read_text())
    base = meta["eval"]["baseline"]["ppl"]["prideprejudice"]
    quant = meta["eval"]["w3 (rtn)"]["ppl"]["prideprejudice"]
    assert base["tokens"] == quant["tokens"] == 3 * 63 and quant["nll_sum"] != base["nll_sum"]
    assert (out / "eval" / "report.md").exists() and (out / "eval" / "report.json").exists()


@pytest.mark.slow  # the bundled model end to end; the same path runs fast on a tiny model above
def test_eval_flag_writes_report_and_wq_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WQ_EVAL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "w3"
    argv = ["--scheme", "W3G128", "-o", str(out), "--no-progress", "--eval", "--eval-seqlen", "128",
            "--eval-windows", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ppl (seqlen 128): baseline" in printed and "eval report:" in printed
    meta = json.loads((out / "wq.json").read_text())
    (dataset,) = meta["eval"]["baseline"]["ppl"]
    base = meta["eval"]["baseline"]["ppl"][dataset]
    quant = meta["eval"]["w3 (rtn)"]["ppl"][dataset]
    assert base["tokens"] == quant["tokens"] and base["seqlen"] == 128
    assert quant["ppl"] > base["ppl"] > 1  # 3-bit RTN costs perplexity
    assert (out / "eval" / "report.md").exists() and (out / "eval" / "report.json").exists()


def test_summary_shows_the_error_the_algorithm_minimises():
    from wq.api import LayerReport, QuantReport
    from wq.quantize import objective_rows

    rep = QuantReport("W4G128", "gptq")
    rep.layers = {f"l{i}": LayerReport("W4G128", 0.15, 0.1, 10, 3, {"output_error": e, "rtn_output_error": r})
                  for i, (e, r) in enumerate([(0.04, 0.06), (0.02, 0.04)])}
    ((label, value),) = objective_rows(rep)
    assert label == "mean relative output error" and value.startswith("0.0300 (rtn on the same inputs: 0.0500")
    rep.layers = {"l": LayerReport("W2G128", 0.3, 0.1, 10, 3, {"loss": 1.0, "rtn_loss": 2.0})}
    assert objective_rows(rep) == [("block output loss", "0.500x rtn's on the same blocks (what gptq minimises)")]
    rep.layers = {"l": LayerReport("W4G128", 0.1, 0.1, 10, 3, {})}
    assert objective_rows(rep) == []
