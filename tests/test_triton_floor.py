"""The Triton floor in pyproject is real: the kernels import, run under the interpreter and compile for
sm_90 with exactly that Triton version.

The floor version is installed into a throwaway virtual environment (which sees this environment's
torch through --system-site-packages; nothing here changes) cached under ~/.cache/wq/triton-floor-<v>
(WQ_CACHE). Triton 3.2's interpreter predates NumPy 2.3 (it calls int() on 1-element arrays), so
that venv gets numpy<2.3 beside it; the compiled path does not use NumPy. Skips, naming the error,
only where the package registry cannot be reached.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def floor_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    versions = set(re.findall(r'"triton>=([0-9.]+)"', text))
    assert len(versions) == 1, f"the triton extra and the dev extra disagree on the floor: {versions}"
    return versions.pop()


def test_backend_floor_matches_pyproject():
    from wq.kernels.triton_backend import TRITON_FLOOR

    assert ".".join(map(str, TRITON_FLOOR)) == floor_version()


@pytest.fixture(scope="module")
def floor_python() -> str:
    from wq.assets import cache_dir

    version = floor_version()
    venv = cache_dir() / f"triton-floor-{version}"
    py = venv / "bin" / "python"
    ok = venv / "installed"
    if not ok.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--clear", str(venv)], check=True)
        pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              f"triton=={version}", "numpy<2.3"], capture_output=True, text=True)
        if pip.returncode != 0:
            pytest.skip(f"cannot install triton=={version} into a venv: {pip.stderr.strip()[-500:]}")
        ok.write_text(version)
    return str(py)


SCRIPT = r"""
import os, sys, torch, triton
want = sys.argv[1].split(".")
assert triton.__version__.split(".")[:len(want)] == want, (triton.__version__, triton.__file__)
from wq.kernels import triton_dequant as tdq, triton_matmul as tmm
from wq.kernels.reference import reference_matmul
from wq.kernels.triton_layout import prepare_triton
from wq.packing import PackedWeight
from wq.primitives import minmax_qparams, quantize
from wq.scheme import QuantScheme
worst = 0.0
for i, (bits, group, sym, act) in enumerate([(2, 64, False, False), (3, 128, False, True), (4, 32, True, True),
                                              (8, -1, True, False)]):
    gen = torch.Generator().manual_seed(i)
    scheme = QuantScheme(bits=bits, group_size=group, sym=sym)
    w = torch.randn(40, 192, generator=gen)
    g_idx = (torch.randperm(192, generator=gen) // scheme.group_for(192)).int() if act else None
    scale, zero = minmax_qparams(w, scheme)
    pw = PackedWeight.from_codes(quantize(w, scale, zero, scheme), scale, zero, scheme, g_idx=g_idx)
    tw = prepare_triton(pw)
    for fn, m in ((tmm.gemv, 1), (tmm.gemv, 3), (tmm.gemm, 12), (tdq.dequant_matmul, 5)):
        x = torch.randn(m, 192, generator=gen).half()
        ref = reference_matmul(x.float(), pw)
        worst = max(worst, ((fn(x, tw).float() - ref).abs().max() / ref.abs().max()).item())
assert worst < 2e-3, worst
print("interpreter ok, worst relative error", worst)
"""

AOT = r"""
import sys, triton
want = sys.argv[1].split(".")
assert triton.__version__.split(".")[:len(want)] == want, triton.__version__
from wq.kernels import triton_aot as A
from wq.kernels.triton_configs import CONFIGS, TARGETS
t = TARGETS["sm90"]
for path, bits, variant, m in (("gemv", 4, "hot", 1), ("gemv", 3, "full", 8), ("gemm_s", 4, "hot", 64),
                               ("gemm_l", 2, "full", 1024), ("dequant", 3, "full", 1)):
    res = A.compile_launch(A.plan(path, bits, CONFIGS["sm90", path, bits], A.VARIANTS[variant], m, t.sms), t)
    assert "error" not in res, (path, bits, res["error"][:2000])
    assert res["shared"] <= t.smem_per_block, (path, bits, res)
    print(path, bits, variant, "registers", res["registers"], "shared", res["shared"], "spill ops",
          res["spill_stores"] + res["spill_loads"])
"""


def _run(py: str, code: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([py, "-c", code, floor_version()], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)


def test_kernels_run_under_the_floor_interpreter(floor_python):
    proc = _run(floor_python, SCRIPT, interpret=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "interpreter ok" in proc.stdout


def test_kernels_compile_for_sm90_with_the_floor(floor_python):
    proc = _run(floor_python, AOT, interpret=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("registers") == 5
