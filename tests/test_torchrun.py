"""Calibration across processes: `torchrun --nproc-per-node 2 -m wq.quantize` (gloo on CPU) writes the
checkpoint one process writes. gptq: bit for bit when each rank's share is whole calibration batches
(the Hessian sums then round the same way); autoround: the signed-gradient steps can flip where a
gradient's sum over ranks is within float rounding of zero, so the tolerance is stated below."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wq.assets import resolve_model


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory) -> Path:
    """A random 2-block Llama with SmolLM2's vocabulary and tokenizer (so the CLI calibrates on real text)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(d)
    for f in Path(resolve_model(None)).glob("tokenizer*"):
        shutil.copy2(f, d / f.name)
    from wq.assets import load_book

    (d / "calib.txt").write_text(load_book("emma")[:40000])
    return d


def _run(args: list[str], procs: int, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
            "-m", "wq.quantize"] if procs > 1 else [sys.executable, "-m", "wq.quantize"]) + args
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["gptq", "autoround"])
def test_two_processes_write_the_one_process_checkpoint(tiny_with_tokenizer, tmp_path, algo):
    src = tiny_with_tokenizer
    common = [str(src), "--scheme", "W4G128", "--algo", algo, "--calib", str(src / "calib.txt"), "--nsamples", "4",
              "--seqlen", "32", "--batch-size", "2", "--format", "wq", "--no-progress", "--iters", "4"]
    repo = Path(__file__).resolve().parents[1]
    _run(common + ["-o", str(tmp_path / "one")], 1, repo)
    _run(common + ["-o", str(tmp_path / "two")], 2, repo)
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    if algo == "gptq":  # each rank's share is one whole batch: the same Hessian sums, the same codes
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    else:  # stated tolerance: at most 0.1% of the packed words differ
        words = [k for k in a if k.endswith("qweight")]
        changed = sum(int((a[k] != b[k]).sum()) for k in words) / sum(a[k].numel() for k in words)
        assert changed <= 1e-3, changed
    meta = json.loads((tmp_path / "two" / "wq.json").read_text())
    assert meta["report"]["layers"]  # written once, by rank 0
