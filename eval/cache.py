"""Evaluation results kept per machine, so nothing is computed twice.

One file per (model, part): each perplexity dataset is a part, the task list is a part. The key is the model's
fingerprint (a directory's weight and config files, or a Hub id and revision), what the part measures (dataset,
protocol, seqlen, windows; or the task settings), the dtype and device, how quantized layers run, and the library
versions (wq's too for quantized checkpoints). So `wq.quantize --eval` followed by `eval.run` with the same
perplexity settings computes each model's perplexity once, and a re-run loads no model at all.

Under several processes rank 0 reads and writes, and broadcasts what it read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

VERSION = 2


class ResultCache:
    def __init__(self, root: Path, *, enabled: bool, state, versions: dict):
        self.root, self.enabled, self.state, self.versions = Path(root), enabled, state, versions

    def path(self, kind: str, fingerprint: str, part: dict) -> Path:
        versions = {k: v for k, v in self.versions.items() if k != "wq" or kind != "baseline"}
        src = {"v": VERSION, "kind": kind, "model": fingerprint, "part": part, "versions": versions}
        key = hashlib.sha256(json.dumps(src, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return self.root / f"{kind}-{key}.json"

    def get(self, path: Path) -> dict | None:
        if not self.enabled:
            return None
        value = None
        if self.state.is_main_process and path.exists():
            value = json.loads(path.read_text())
            log.info("cached: %s (--no-cache recomputes)", path.name)
        if self.state.num_processes > 1:
            box = [value]
            torch.distributed.broadcast_object_list(box, src=0)
            value = box[0]
        return value

    def put(self, path: Path, value: dict) -> None:
        if not self.enabled or not self.state.is_main_process:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)  # concurrent runs never read half a file
