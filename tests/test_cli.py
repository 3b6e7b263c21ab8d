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
        (["./does-not-exist", "--scheme", "W4G128", "-o", "X"], "not found"),
        (["--override", "down_proj", "-o", "X"], "PATTERN=SCHEME"),
        (["--format", "gtpq", "-o", "X"], "Did you mean 'gptq'"),
        (["--algo", "recon", "--init", "gtpq", "-o", "X"], "--init gtpq: choose one of rtn, gptq, autoround"),
        (["--algo", "awq", "--quantizer", "hqq", "-o", "X"], "--quantizer hqq"),
        (["--bits-budget", "3", "--bits-candidates", "W5G128", "-o", "X"], "W<bits>G<group>"),
    ],
)
def test_bad_input_errors(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "X").exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    (tmp_path / "o").mkdir()
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
    quant = meta["eval"]["W3G128"]["ppl"][dataset]
    assert base["tokens"] == quant["tokens"] and base["seqlen"] == 128
    assert quant["ppl"] > base["ppl"] > 1  # 3-bit RTN costs perplexity
    assert (out / "eval" / "report.md").exists() and (out / "eval" / "report.json").exists()
