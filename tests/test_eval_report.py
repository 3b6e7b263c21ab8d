import json
import math

from eval import report as R


def _model(ppl_windows, acc, acc_se, bpw, seqlen=65, algo=None, scheme=None):
    nll = sum(ppl_windows)
    tokens = len(ppl_windows) * (seqlen - 1)
    return {"model": "m", "bits_per_weight": bpw, "algo": algo, "scheme": scheme,
            "ppl": {"prideprejudice": {"ppl": math.exp(nll / tokens), "nll_sum": nll, "tokens": tokens,
                                       "seqlen": seqlen, "window_nll": ppl_windows}},
            "tasks": {"austen_lastword": {"acc": acc, "acc_stderr": acc_se, "perplexity": 40.0, "n": 100},
                      "austen_continuation": {"acc": 0.5, "acc_stderr": 0.05, "acc_norm": 0.6,
                                              "acc_norm_stderr": 0.05, "n": 100}}}


def _report():
    base = _model([200.0, 210.0, 190.0, 205.0], 0.40, 0.02, 16.0)
    w4 = _model([201.0, 211.2, 190.9, 206.1], 0.39, 0.02, 4.25, algo="rtn", scheme="W4G128")  # small, consistent loss
    w2 = _model([300.0, 330.0, 280.0, 310.0], 0.10, 0.02, 2.25, algo="gptq", scheme="W2G128")
    settings = {"dtype": "float32", "device": "cpu", "world_size": 1, "seqlen": 65, "windows": 4,
                "ppl_protocols": {"prideprejudice": "windows"}, "tasks": {"limit": None}}
    return R.build_report(base, {"W4G128": w4, "W2G128": w2}, settings, {"torch": "x"})


def test_schema_and_deltas():
    rep = _report()
    assert rep["models"] == ["baseline", "W4G128", "W2G128"]
    for name in rep["models"]:
        entry = rep[name]["ppl"]["prideprejudice"]
        assert set(entry) >= {"ppl", "nll_sum", "tokens", "seqlen"}
        assert "tasks" in rep[name]
    d = rep["deltas"]["W4G128"]["ppl"]["prideprejudice"]
    b, q = rep["baseline"]["ppl"]["prideprejudice"]["ppl"], rep["W4G128"]["ppl"]["prideprejudice"]["ppl"]
    assert math.isclose(d["delta"], q - b) and math.isclose(d["relative"], (q - b) / b)
    assert math.isclose(d["recovery"], b / q) and d["recovery"] < 1
    acc = rep["deltas"]["W2G128"]["tasks"]["austen_lastword"]["acc"]
    assert math.isclose(acc["delta"], -0.30) and math.isclose(acc["recovery"], 0.25)
    assert acc["significant"] is True
    lw_ppl = rep["deltas"]["W2G128"]["tasks"]["austen_lastword"]["perplexity"]
    assert lw_ppl["recovery"] == 1.0  # lower is better: recovery = baseline / quant
    assert math.isclose(rep["deltas"]["W2G128"]["avg_acc"]["quant"], (0.10 + 0.5) / 2)
    json.dumps(rep)  # serializable


def test_significance_is_paired_over_windows():
    rep = _report()
    # every window of W4 is ~0.5% worse: tiny but consistent -> significant under the paired test
    assert rep["deltas"]["W4G128"]["ppl"]["prideprejudice"]["significant"] is True
    # a 1-point accuracy drop with 2-point stderrs is not
    assert rep["deltas"]["W4G128"]["tasks"]["austen_lastword"]["acc"]["significant"] is False
    same = R.compare_ppl(rep["baseline"]["ppl"]["prideprejudice"], rep["baseline"]["ppl"]["prideprejudice"])
    assert same["delta"] == 0 and same["significant"] is False and same["recovery"] == 1.0


def test_reserved_names_rejected():
    import pytest

    with pytest.raises(ValueError, match="rename"):
        R.build_report(_model([1.0, 2.0], 0.1, 0.01, 16), {"settings": _model([1.0, 2.0], 0.1, 0.01, 4)}, {}, {})


def test_write_report_files(tmp_path):
    out = R.write_report(_report(), tmp_path / "eval")
    rep = json.loads((out / "report.json").read_text())
    assert rep["schema"] == R.SCHEMA
    md = (out / "report.md").read_text()
    assert "| W4G128 | rtn | W4G128 | 4.25 |" in md and "| baseline | — | — | 16.00 |" in md
    assert "ppl prideprejudice" in md and "- W2G128: `m`" in md
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_plot_axis_and_points():
    rep = _report()
    pts = R._points(rep, "ppl", "prideprejudice")
    assert [(n, a) for _, _, n, a in pts] == [("W4G128", "rtn"), ("W2G128", "gptq")]
    assert R.axis_scale([20.0, 27.0, 76.0]) == "linear" and R.axis_scale([20.0, 30000.0]) == "log"


def test_markdown_names_how_many_docs_were_scored():
    rep = _report()
    assert "- tasks: all docs per task" in R.to_markdown(rep)
    rep["settings"]["tasks"] = {"limit": 30, "local_docs": 500, "batch_size": 8, "add_bos": False}
    line = [x for x in R.to_markdown(rep).splitlines() if x.startswith("- tasks:")][0]
    assert line.startswith("- tasks: first 30 docs (local tasks: 500 generated) per task, batch 8")
