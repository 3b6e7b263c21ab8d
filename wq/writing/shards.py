"""ShardWriter: safetensors shards written as tensors arrive, so a checkpoint never has to be in memory whole.

    w = ShardWriter(target_dir, max_bytes=4 * 1024**3)
    w.add("model.layers.0.self_attn.q_proj.qweight", t)   # its bytes go to disk now; nothing is buffered
    ...
    w.close()   # the last shard; files renamed model-0000k-of-0000n.safetensors (+ index when n > 1)

One shard: `model.safetensors` and no index, as transformers writes small models.

A safetensors file starts with a header that names every tensor it holds, which is not known until the
shard is full. So each tensor's bytes are appended at once to a temporary data file of its alignment
class (8-, 4-, 2- and 1-byte elements); when the shard closes, the header is written and the four data
files are copied after it, largest alignment first: every tensor starts at a multiple of its element
size and the data has no holes, as safetensors' own writer lays it out. Memory: one tensor at a time
(the price: the output is written to disk twice, in kernel copies).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ..loading.shards import DTYPES, StoredTensor

MAX_SHARD_BYTES = 4 * 1024**3
_NAMES = {v: k for k, v in DTYPES.items()}  # torch dtype -> safetensors dtype string
_ALIGNS = (8, 4, 2, 1)


class _OpenShard:
    """One shard being written: per alignment class a data file and the tensors in it, in order."""

    def __init__(self, target: Path, stem: str):
        self.target, self.stem = target, stem
        self.files: dict[int, object] = {}
        self.sizes = dict.fromkeys(_ALIGNS, 0)
        self.entries: dict[str, tuple[int, int, int, str, list[int]]] = {}  # name -> (align, start, end, dtype, shape)
        self.size = 0

    def _data(self, align: int) -> Path:
        return self.target / f"{self.stem}.data{align}"

    def add(self, name: str, t: torch.Tensor | StoredTensor) -> None:
        stored = isinstance(t, StoredTensor)
        if not stored:
            t = t.detach().cpu().contiguous()
        if t.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        align = t.element_size()
        n = t.numel() * align
        if n:
            fh = self.files.get(align)
            if fh is None:
                fh = self.files[align] = open(self._data(align), "wb")  # noqa: SIM115 (closed in write())
            if stored:
                _copy_range(t, fh)
            else:
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        start = self.sizes[align]
        self.entries[name] = (align, start, start + n, _NAMES[t.dtype], list(t.shape))
        self.sizes[align] += n
        self.size += n

    def write(self, path: Path, metadata: dict[str, str]) -> None:
        """The header, then the data files, largest alignment first."""
        for fh in self.files.values():
            fh.close()
        base, offset = {}, 0
        for a in _ALIGNS:
            base[a] = offset
            offset += self.sizes[a]
        header: dict = {"__metadata__": metadata} if metadata else {}
        for name, (a, s, e, dtype, shape) in self.entries.items():
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [base[a] + s, base[a] + e]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # the data section starts at a multiple of 8, as safetensors pads it
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            out.flush()
            for a in _ALIGNS:
                if a in self.files:
                    _append(self._data(a), out)
                    self._data(a).unlink()

    def discard(self) -> None:
        for a, fh in self.files.items():
            fh.close()
            self._data(a).unlink(missing_ok=True)


def _copy_range(t: StoredTensor, out) -> None:
    """Append t's bytes from its file to the open file `out`, never the whole tensor in memory."""
    if t.nbytes != t.numel() * t.element_size():
        raise ValueError(f"{t.file}: {t.nbytes} bytes for shape {list(t.shape)} ({t.dtype}); the file is corrupt")
    _copy_bytes(t.file, t.offset, t.nbytes, out)


def _append(src: Path, out) -> None:
    """Copy the file `src` to the end of the open file `out`."""
    _copy_bytes(src, 0, src.stat().st_size, out)


def _copy_bytes(src: Path, offset: int, nbytes: int, out) -> None:
    """Append `nbytes` of `src` from `offset` to the open file `out` (flushed before and after): in the kernel
    where it can (copy_file_range), else in 16 MiB pieces."""
    left, pos = nbytes, offset
    kernel = hasattr(os, "copy_file_range")
    out.flush()
    with open(src, "rb") as f:
        while left > 0:
            if kernel:
                try:
                    n = os.copy_file_range(f.fileno(), out.fileno(), min(left, 1 << 30), pos)
                except OSError:  # not between these file systems: plain copies from here on
                    kernel = False
                    continue
            else:
                chunk = os.pread(f.fileno(), min(left, 16 << 20), pos)
                n = len(chunk)
                out.write(chunk)
            if n == 0:
                raise OSError(f"{src}: the file ended {left} bytes early; it is truncated")
            left -= n
            pos += n
    out.flush()


class ShardWriter:
    def __init__(self, target: str | os.PathLike, max_bytes: int = MAX_SHARD_BYTES):
        self.target = Path(target)
        self.max_bytes = max_bytes
        self._open: _OpenShard | None = None
        self._files: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total = 0
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor | StoredTensor) -> None:
        """Write `tensor`'s bytes now (a StoredTensor is copied file to file, never read into memory)."""
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._open is not None and self._open.entries and self._open.size + nbytes > self.max_bytes:
            self.flush()
        if self._open is None:
            self._open = _OpenShard(self.target, f".shard-{len(self._files) + 1:05d}")
        self._open.add(name, tensor)
        self.total += nbytes

    def add_many(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.add(k, v)

    def flush(self) -> None:
        """Finish the open shard now."""
        if self._open is None or not self._open.entries:
            return
        tmp = f"{self._open.stem}.safetensors"
        try:
            self._open.write(self.target / tmp, {"format": "pt"})
        except BaseException:
            self._open.discard()
            raise
        self._files.append((tmp, list(self._open.entries)))
        self._open = None

    def close(self) -> list[str]:
        """Write what is left, give the files their final names and the index. Returns the file names."""
        self.flush()
        n = len(self._files)
        if n == 0:
            _OpenShard(self.target, ".shard-empty").write(self.target / "model.safetensors", {"format": "pt"})
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
