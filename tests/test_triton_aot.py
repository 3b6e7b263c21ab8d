"""The ahead-of-time compile check (wq/kernels/triton_aot.py): every row of the dispatcher's config
table, compiled by Triton's own compiler for sm_80, sm_86, sm_89, sm_90 and gfx942, within each
target's shared memory, without register spills on hot rows.

Compiling needs a process without TRITON_INTERPRET (the interpreter has no compiler), so the check
runs in a subprocess. Results are cached under ~/.cache/wq/triton-aot (WQ_CACHE): a cold run compiles
~180 kernels (minutes on 2 cores, see docs/kernels.md), a warm one reads JSON (seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from wq.kernels import triton_aot  # noqa: E402
from wq.kernels.triton_configs import CONFIGS, TARGETS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], code: str | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # the default, without 3.9's warning
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "wq.kernels.triton_aot", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def test_every_config_compiles_within_limits_for_every_target(tmp_path):
    out = tmp_path / "aot.json"
    proc = _run(["--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    done = {(r["target"], r["path"], r["bits"], r["variant"]) for r in report["rows"]}
    # the check enumerates the table itself: every row of CONFIGS, for every target of its family
    expected = {(t.name, path, bits, f"{v} M={m}") for t, path, bits, _, v, m in triton_aot.jobs()}
    assert done == expected
    assert {(f, p, b) for f, p, b in CONFIGS} == {(TARGETS[t].family, p, b) for t, p, b, _ in done}
    assert {t for t, *_ in done} == {"sm80", "sm86", "sm89", "sm90", "gfx942"}
    for r in report["rows"]:
        res = r["result"]
        assert not r["problems"] and "error" not in res, r
        assert 0 <= res["shared"] <= TARGETS[r["target"]].smem_per_block and res["blocks_per_sm"] >= 1
        if r["hot"]:
            assert res["spill_stores"] == res["spill_loads"] == 0


def test_the_check_fails_a_config_over_the_shared_memory_limit():
    """A real compile of a tile that cannot fit an sm_86 block (99 KiB) is reported, not passed."""
    code = (
        "from wq.kernels import triton_aot as A\n"
        "from wq.kernels.triton_configs import TileConfig\n"
        "rows = A.check(['sm86'], configs={('sm86', 'gemm_l', 8): TileConfig(128, 256, 128, 8, 4)})\n"
        "print([(r.variant, r.result.get('shared'), r.problems) for r in rows])\n"
    )
    proc = _run([], code=code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shared memory" in proc.stdout and "> 101376 B per block" in proc.stdout, proc.stdout


def test_problems_names_each_limit():
    t = TARGETS["sm89"]
    ok = {"shared": 1000, "spill_stores": 0, "spill_loads": 0, "blocks_per_sm": 4}
    assert triton_aot.problems(ok, t, hot=True) == []
    assert "shared memory 101377 B > 101376 B" in triton_aot.problems({**ok, "shared": 101377}, t, True)[0]
    spilled = {**ok, "spill_stores": 3, "spill_loads": 2}
    assert "spills registers" in triton_aot.problems(spilled, t, hot=True)[0]
    assert triton_aot.problems(spilled, t, hot=False) == []  # spills fail only hot rows
    assert "does not compile" in triton_aot.problems({"error": "CompilationError: x"}, t, True)[0]
    assert triton_aot.problems({**ok, "blocks_per_sm": 0}, t, True) == ["no block fits on one SM"]


def test_predicted_blocks_per_sm():
    h100 = TARGETS["sm90"]
    assert triton_aot.blocks_per_sm(h100, registers=64, shared=0, warps=4) == 8  # 65536 / (64*128)
    assert triton_aot.blocks_per_sm(h100, registers=255, shared=0, warps=8) == 1
    assert triton_aot.blocks_per_sm(h100, registers=32, shared=100_000, warps=4) == 2  # 233472 // 101024
    assert triton_aot.blocks_per_sm(TARGETS["sm86"], registers=32, shared=0, warps=1) == 16  # the block cap


def test_cache_key_changes_with_what_is_compiled():
    code = (
        "from wq.kernels import triton_aot as A\n"
        "from wq.kernels.triton_configs import CONFIGS, TARGETS, TileConfig\n"
        "cfg, v = CONFIGS['sm90', 'gemv', 4], A.VARIANTS['hot']\n"
        "a = A.plan('gemv', 4, cfg, v, 1, 132)\n"
        "b = A.plan('gemv', 4, TileConfig(8, cfg.block_n, cfg.block_k, cfg.num_warps, 2), v, 1, 132)\n"
        "c = A.plan('gemv', 4, cfg, A.VARIANTS['full'], 1, 132)\n"
        "sm90, sm80 = TARGETS['sm90'], TARGETS['sm80']\n"
        "assert A.cache_key(a, sm90) == A.cache_key(a, sm90)\n"
        "keys = {A.cache_key(a, sm90), A.cache_key(b, sm90), A.cache_key(c, sm90), A.cache_key(a, sm80)}\n"
        "print(len(keys))\n"
    )
    proc = _run([], code=code)
    assert proc.returncode == 0 and proc.stdout.split() == ["4"], proc.stdout + proc.stderr[-3000:]
