"""ShardWriter: safetensors shards written as tensors arrive, so a checkpoint never has to be in memory whole.

    w = ShardWriter(target_dir, max_bytes=2 * 1024**3)
    w.add("model.layers.0.self_attn.q_proj.qweight", t)   # buffered; a full shard is written at once
    ...
    w.close()   # the last shard; files renamed model-0000k-of-0000n.safetensors (+ index when n > 1)

One shard: `model.safetensors` and no index, as transformers writes small models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

MAX_SHARD_BYTES = 4 * 1024**3


class ShardWriter:
    def __init__(self, target: str | os.PathLike, max_bytes: int = MAX_SHARD_BYTES):
        self.target = Path(target)
        self.max_bytes = max_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._size = 0
        self._files: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total = 0
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._buf and self._size + nbytes > self.max_bytes:
            self.flush()
        self._buf[name] = tensor.detach().contiguous().cpu()
        self._size += nbytes
        self.total += nbytes

    def add_many(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.add(k, v)

    def flush(self) -> None:
        """Write the buffered tensors as one shard now."""
        if not self._buf:
            return
        tmp = f".shard-{len(self._files) + 1:05d}.safetensors"
        save_file(self._buf, str(self.target / tmp), metadata={"format": "pt"})
        self._files.append((tmp, list(self._buf)))
        self._buf, self._size = {}, 0

    def close(self) -> list[str]:
        """Write what is left, give the files their final names and the index. Returns the file names."""
        self.flush()
        n = len(self._files)
        if n == 0:
            save_file({}, str(self.target / "model.safetensors"), metadata={"format": "pt"})
            return ["model.safetensors"]
        if n == 1:
            os.replace(self.target / self._files[0][0], self.target / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (tmp, keys) in enumerate(self._files, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.target / tmp, self.target / final)
            weight_map.update(dict.fromkeys(keys, final))
            names.append(final)
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names
