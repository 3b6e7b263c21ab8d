import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_helpers import _tiny_quant_dir, default_dir, tiny_dir, tiny_w4_dir, tokenizer  # noqa: F401

from eval import models as M
from eval import run

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(ppl=["austen"], seqlen=64, windows=4, cache=False)
NAME = "W4G32 (rtn)"  # the checkpoint's directory and algorithm


def test_evaluate_tiny_quant_checkpoint(tiny_dir, tiny_w4_dir, tmp_path):  # noqa: F811
    rep = run.evaluate(tiny_w4_dir, baseline=tiny_dir, tasks=["austen"], limit=4, local_docs=20,
                       out=tmp_path / "r", **SMALL)
    assert rep["models"] == ["baseline", NAME]
    q, b = rep[NAME], rep["baseline"]
    assert q["algo"] == "rtn" and q["scheme"] == "W4G32" and q["model"] == tiny_w4_dir
    assert q["bits_per_weight"] == pytest.approx(5.0)  # 4 bits + fp16 scale and zero per 32 weights
    assert b["bits_per_weight"] == 16.0
    for m in (b, q):
        e = m["ppl"]["prideprejudice"]
        assert e["seqlen"] == 64 and e["tokens"] == 4 * 63 and math.isclose(e["ppl"], math.exp(e["nll_sum"] / e["tokens"]))
        assert m["tasks"]["austen_continuation"]["n"] == 4
    assert q["ppl"]["prideprejudice"]["nll_sum"] != b["ppl"]["prideprejudice"]["nll_sum"]
    assert rep["settings"]["dtype"] == "float32" and rep["settings"]["quant_forward"] == "dequantized"
    assert set(rep["deltas"][NAME]) == {"ppl", "tasks", "avg_acc"}
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.json", "report.md", "report.png"}


def test_dequantized_forward_equals_reference_kernel(tiny_dir, tiny_w4_dir, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WQ_KERNEL", "reference")
    a = run.evaluate(tiny_w4_dir, baseline=tiny_dir, quant_forward="dequantized", **SMALL)
    k = run.evaluate(tiny_w4_dir, baseline=tiny_dir, quant_forward="kernels", **SMALL)
    assert a[NAME]["ppl"]["prideprejudice"]["nll_sum"] == k[NAME]["ppl"]["prideprejudice"]["nll_sum"]


def test_in_memory_model_is_left_quantized(tiny_dir, tiny_w4_dir):  # noqa: F811
    import wq
    from wq.nn import QuantLinear

    model = wq.load(tiny_w4_dir, dtype=torch.float32)
    n_q = sum(isinstance(m, QuantLinear) for m in model.modules())
    rep = run.evaluate(model, baseline=tiny_dir, **SMALL)
    assert rep["models"] == ["baseline", NAME]
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == n_q > 0


def test_results_cache_is_reused_and_keyed_by_settings(tiny_dir, tiny_w4_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WQ_EVAL_CACHE", str(tmp_path / "cache"))
    kw = {**SMALL, "cache": True}
    first = run.evaluate(tiny_w4_dir, baseline=tiny_dir, **kw)
    (base_file,) = (tmp_path / "cache").glob("baseline-*.json")
    (quant_file,) = (tmp_path / "cache").glob("quant-*.json")
    for f, value in ((base_file, 12345.0), (quant_file, 23456.0)):  # proves the second run reads the cache
        cached = json.loads(f.read_text())
        cached["ppl"]["prideprejudice"]["ppl"] = value
        f.write_text(json.dumps(cached))
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("a cached model was loaded"))
    second = run.evaluate(tiny_w4_dir, baseline=tiny_dir, **kw)
    assert second["baseline"]["ppl"]["prideprejudice"]["ppl"] == 12345.0
    assert second[NAME]["ppl"]["prideprejudice"]["ppl"] == 23456.0 and second[NAME]["algo"] == "rtn"
    assert second[NAME]["bits_per_weight"] == first[NAME]["bits_per_weight"]
    monkeypatch.undo()
    monkeypatch.setenv("WQ_EVAL_CACHE", str(tmp_path / "cache"))
    run.evaluate(tiny_w4_dir, baseline=tiny_dir, **{**kw, "windows": 3})  # other settings -> other key
    assert len(list((tmp_path / "cache").glob("baseline-*.json"))) == 2
    assert len(list((tmp_path / "cache").glob("quant-*.json"))) == 2
    # adding tasks to the same perplexity settings computes only the tasks (e.g. after wq.quantize --eval)
    calls = []
    real = run.perplexity
    monkeypatch.setattr(run, "perplexity", lambda *a, **k: calls.append(1) or real(*a, **k))
    third = run.evaluate(tiny_w4_dir, baseline=tiny_dir, tasks=["austen_lastword"], limit=1, local_docs=20, **kw)
    assert calls == [] and third["baseline"]["ppl"]["prideprejudice"]["ppl"] == 12345.0
    assert third[NAME]["tasks"]["austen_lastword"]["n"] == 1


def test_cli_writes_reports_next_to_the_first_quant(tiny_dir, tmp_path):  # noqa: F811
    import shutil

    q = tmp_path / "W4G32"
    shutil.copytree(_tiny_quant_dir("W4G32"), q)
    rc = run.main(["--baseline", tiny_dir, "--quant", str(q), "--quant", str(q), "--ppl", "persuasion",
                   "--seqlen", "64", "--windows", "3", "--no-cache"])
    assert rc == 0
    rep = json.loads((q / "eval" / "report.json").read_text())
    assert rep["models"][:2] == ["baseline", NAME] and rep["models"][2].endswith(f"/{NAME}")
    assert list(rep["baseline"]["ppl"]) == ["persuasion"]


def test_cli_names_a_missing_quant_dir_before_any_work(tiny_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "w4").mkdir(parents=True)
    (tmp_path / "out" / "w4" / "gptq").mkdir()
    (tmp_path / "out" / "w4" / "gptq" / "config.json").write_text("{}")
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert run.main(["--baseline", tiny_dir, "--quant", "out/w3", "--no-cache"]) == 2
    assert "no such local directory" in capsys.readouterr().err
    assert run.main(["--baseline", tiny_dir, "--quant", "out/w4", "--no-cache"]) == 2
    assert "holds the formats gptq: give out/w4/<format>" in capsys.readouterr().err


def test_model_helpers(tiny_w4_dir, tiny_dir):  # noqa: F811
    assert M.quant_info(tiny_dir) is None
    assert M.quant_info(tiny_w4_dir)["scheme"] == "W4G32" and M.quant_info(tiny_w4_dir)["algo"] == "rtn"
    assert M.model_name("out/w4", {"algo": "gptq"}, set()) == "w4 (gptq)"
    assert M.model_name("b/w4", {"algo": "gptq"}, {"w4 (gptq)"}) == "b/w4 (gptq)"  # same directory name: + parent
    assert M.model_name("baseline", None, set()) == "baseline-2"  # reserved words are never model names
    assert M.parse_dtype(None, "cpu") == torch.float32 and M.parse_dtype(None, "cuda") == torch.bfloat16
    assert M.resolve_quant_forward("auto", "cpu") == "dequantized"
    with pytest.raises(ValueError, match="choose from"):
        M.resolve_quant_forward("fast", "cpu")


def _torchrun(args, out):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "eval.run", *args, "--no-cache", "-o", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_two_processes_give_the_single_process_numbers(tiny_dir, tiny_w4_dir, tmp_path):  # noqa: F811
    """torchrun --nproc-per-node 2 (gloo on CPU): windows and lm-eval requests are sharded."""
    args = ["--baseline", tiny_dir, "--quant", tiny_w4_dir, "--ppl", "austen", "--seqlen", "64",
            "--windows", "5", "--tasks", "austen", "--limit", "5", "--local-docs", "20"]
    two = _torchrun(args, tmp_path / "two")
    one = run.evaluate(tiny_w4_dir, baseline=tiny_dir, ppl=["austen"], seqlen=64, windows=5, tasks=["austen"],
                       limit=5, local_docs=20, cache=False)
    assert two["settings"]["world_size"] == 2 and one["settings"]["world_size"] == 1
    for name in ("baseline", NAME):
        p1, p2 = one[name]["ppl"]["prideprejudice"], two[name]["ppl"]["prideprejudice"]
        assert p2["tokens"] == p1["tokens"] and math.isclose(p2["ppl"], p1["ppl"], rel_tol=1e-4)
        for task in ("austen_lastword", "austen_continuation"):
            t1, t2 = one[name]["tasks"][task], two[name]["tasks"][task]
            assert t2["n"] == t1["n"] == 5
            assert t2["acc"] == t1["acc"]


@pytest.mark.slow
def test_real_w4_checkpoint_costs_perplexity(default_dir, tokenizer, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    import wq

    model = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32)
    wq.quantize_model(model, "W4G128", progress=False)
    wq.save(model, tmp_path / "w4", tokenizer=tokenizer)
    rep = run.evaluate(str(tmp_path / "w4"), baseline="default", ppl=["austen"], seqlen=256, windows=3, cache=False)
    d = rep["deltas"]["w4 (rtn)"]["ppl"]["prideprejudice"]
    assert 0 < d["relative"] < 1.0, d  # ASSETS.md: about +30% for plain RTN W4G128
    assert rep["w4 (rtn)"]["bits_per_weight"] == pytest.approx(4.27, abs=0.01)  # partial last groups of 576
