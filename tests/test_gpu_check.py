"""scripts/gpu_check.sh, as far as it goes without a GPU: the dry run of its quick steps, the report it
writes, and the headline numbers it reads back from the kernel benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402

pytest.importorskip("triton")


def test_dry_run_of_the_quick_steps_writes_the_report(tmp_path):
    out = tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WQ_KERNEL")}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--fast", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert report["dry_run"] and list(steps) == [s.name for s in gpu_check.steps(out, Path("/v"))]
    fast = {s.name for s in gpu_check.steps(out, Path("/v")) if s.fast}
    assert fast == {"aot_device", "bench_kernels", "bench_decode"}
    for name, r in steps.items():
        if name in fast:
            assert r["status"] == "ok", (name, r)
            assert (out / r["log"]).read_text().startswith("$ ")
        else:
            assert r["status"] == "skipped" and r["reason"], (name, r)
    aot = json.loads((out / "aot_device.json").read_text())
    assert aot["rows"] and all(not r["problems"] for r in aot["rows"])
    assert json.loads((out / "kernels.json").read_text())["rows"]
    assert json.loads((out / "decode.json").read_text())["rows"]
    md = (out / "gpu_check.md").read_text()
    assert "(dry run)" in md and "| bench_kernels | ok |" in md


def test_steps_that_need_cuda_are_skipped_with_a_reason(tmp_path):
    step = gpu_check.Step("x", "a CUDA step", [sys.executable, "-c", "pass"], None, 10)
    assert gpu_check.run_step(step, dry=False, out=tmp_path, cuda=False, status={}, deadline=1e12) == {
        "status": "skipped", "reason": "no CUDA device"}
    assert gpu_check.run_step(step, dry=True, out=tmp_path, cuda=False, status={}, deadline=1e12)["reason"].startswith(
        "needs CUDA")
    needs = gpu_check.Step("y", "", [sys.executable, "-c", "pass"], [sys.executable, "-c", "pass"], 10, needs=["x"])
    r = gpu_check.run_step(needs, dry=True, out=tmp_path, cuda=False, status={"x": {"status": "failed"}},
                           deadline=1e12)
    assert r == {"status": "skipped", "reason": "needs x, which did not succeed"}
    (tmp_path / "logs").mkdir()
    failing = gpu_check.Step("z", "", [], [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 10)
    r = gpu_check.run_step(failing, dry=True, out=tmp_path, cuda=False, status={}, deadline=1e12)
    assert r["status"] == "failed" and r["returncode"] == 3 and "boom" in r["tail"]
    late = gpu_check.run_step(failing, dry=True, out=tmp_path, cuda=False, status={}, deadline=0)
    assert late["status"] == "skipped" and "time budget" in late["reason"]


def test_headline_reads_the_targets_from_the_kernel_benchmark(tmp_path):
    def row(scheme, n, k, m, speedup):
        return {"scheme": scheme, "N": n, "K": k, "M": m, "eager": {"speedup": speedup / 2},
                "graph": {"speedup": speedup}}

    rows = [row("W4G128", 4096, 14336, 1, 3.2), row("W2G128", 28672, 4096, 1, 4.1), row("W4G128", 4096, 4096, 256, 0.9),
            row("W4G128", 4096, 4096, 1024, 0.5)]
    (tmp_path / "kernels.json").write_text(json.dumps({"rows": rows}))
    head = gpu_check.headline(tmp_path)
    assert head["batch1"]["W4G128 4096x14336"] == {"speedup": 3.2, "target": 3.0, "met": True}
    assert head["batch1"]["W2G128 28672x4096"]["met"] is False
    assert head["slower_than_bf16_up_to_m256"] == ["W4G128 4096x4096 M=256"]
