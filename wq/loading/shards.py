"""Read a checkpoint's tensors one at a time from its safetensors shards, never the whole model.

    src = ShardReader.open("meta-llama/Llama-3.1-8B")     # a hub id (downloaded by huggingface_hub) or a dir
    src.names()                                            # every tensor name, from the index / headers only
    w = src.get("model.layers.3.mlp.up_proj.weight")       # one tensor, read through a memory map

Any number of shards and any sharding (a block split across files is fine): the index (or each
file's header) says which file holds which tensor. Tensors are read with positional file reads into
memory of their own, not as views of a memory map: a view keeps the pages it touched in the process's
resident set for as long as the file stays mapped (safetensors keeps the whole file mapped while any
tensor of it lives), so a streamed run's RSS would grow by every block it ever read. Sources stored in FP8 with block scales
(DeepSeek-V3/R1, several Qwen3 releases: `X.weight` float8_e4m3 beside `X.weight_scale_inv`
[ceil(out/B), ceil(in/B)], `quantization_config.weight_block_size` [B, B]) are dequantized on read,
so their companions never show up as tensors: what a caller sees is a plain bf16/fp32 checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_FP8 = {torch.float8_e4m3fn, torch.float8_e5m2}
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16,
          "U32": torch.uint32, "U64": torch.uint64}


@dataclass(frozen=True)
class StoredTensor:
    """A tensor left where it is stored: `nbytes` bytes at `offset` of `file`. A writer copies it file to file
    (in the kernel) without it ever being in memory: how plain tensors (embeddings, norms) pass through."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def element_size(self) -> int:
        return self.dtype.itemsize


class ShardError(UserError, ValueError):
    """A checkpoint that cannot be read as safetensors shards (names the file and the cause)."""


def _weight_map(path: Path) -> dict[str, str]:
    """tensor name -> file name, from the index or the files' own headers."""
    index = path / INDEX
    if index.exists():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError) as e:
            raise ShardError(f"{index}: not a safetensors index ({e})") from None
    files = [path / SINGLE] if (path / SINGLE).exists() else sorted(path.glob("*.safetensors"))
    if not files:
        raise ShardError(f"{path}: no safetensors weights (model.safetensors or an index); wq streams safetensors "
                         "checkpoints only")
    out = {}
    for f in files:
        for name in _open(f).keys():
            out[name] = f.name
    return out


class ShardFile:
    """One safetensors file: its header (dtype, shape and byte range of every tensor), and positional reads
    of one tensor at a time into a fresh buffer (no memory map)."""

    def __init__(self, file: Path):
        self.file = file
        try:
            size = file.stat().st_size
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header of {n} bytes in a file of {size}")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            self.start = 8 + n  # the data section
            end = max((e["data_offsets"][1] for e in header.values()), default=0)
            if self.start + end > size:
                raise ValueError(f"the header needs {self.start + end} bytes, the file has {size}")
            for e in header.values():
                if e["dtype"] not in DTYPES:
                    raise ValueError(f"unknown dtype {e['dtype']}")
        except Exception as e:  # a truncated or corrupt shard: say which file and what is wrong
            raise ShardError(f"{file}: cannot read safetensors ({type(e).__name__}: {e}); the file is truncated or "
                             "corrupt: download it again") from None
        self.entries: dict[str, dict] = header
        self._fd: int | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> Tensor:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        t = torch.empty(e["shape"], dtype=DTYPES[e["dtype"]])
        if end - begin != t.numel() * t.element_size():
            raise ShardError(f"{self.file}: {name} holds {end - begin} bytes, its shape and dtype need "
                             f"{t.numel() * t.element_size()}; the file is corrupt")
        if t.numel() == 0:
            return t
        if self._fd is None:
            self._fd = os.open(self.file, os.O_RDONLY)
        buf = memoryview(t.view(-1).view(torch.uint8).numpy())  # the tensor's own bytes
        done, offset = 0, self.start + begin
        while done < len(buf):  # one read returns at most ~2 GiB
            got = os.preadv(self._fd, [buf[done:]], offset + done)
            if got <= 0:
                raise ShardError(f"{self.file}: the file ended inside {name}; it is truncated: download it again")
            done += got
        return t

    def stored(self, name: str) -> StoredTensor:
        """Where `name`'s bytes are, without reading them."""
        e = self.entries[name]
        begin, end = e["data_offsets"]
        return StoredTensor(self.file, self.start + begin, end - begin, DTYPES[e["dtype"]], tuple(e["shape"]))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open(file: Path) -> ShardFile:
    return ShardFile(file)


class ShardReader:
    """Lazy, per-tensor access to the tensors of a local safetensors checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.weight_map = _weight_map(self.path)
        self._handles: dict[str, ShardFile] = {}
        cfg = self.path / "config.json"
        self.config = json.loads(cfg.read_text()) if cfg.exists() else {}
        qcfg = self.config.get("quantization_config") or {}
        self.fp8_block = qcfg.get("weight_block_size") if qcfg.get("quant_method") == "fp8" else None
        missing = sorted({f for f in self.weight_map.values() if not (self.path / f).exists()})
        if missing:
            raise ShardError(f"{self.path}: the index names shard(s) that are not there: {', '.join(missing[:3])}")

    @classmethod
    def open(cls, source: str | os.PathLike, *, revision: str | None = None) -> ShardReader:
        """A local directory, or a Hub id whose config and safetensors shards huggingface_hub downloads
        (to its cache on disk; nothing is loaded into memory)."""
        p = Path(source).expanduser()
        if p.is_dir():
            return cls(p)
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(source), revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        return cls(local)

    # ---------------------------------------------------------------------------------- names
    def names(self) -> list[str]:
        """Tensor names as a model sees them (FP8 scale companions folded into their weights)."""
        hidden = {n for n in self.weight_map if n.endswith("_scale_inv") and self.fp8_block}
        return [n for n in self.weight_map if n not in hidden]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> str:
        return self.weight_map[name]

    def _handle(self, file: str):
        h = self._handles.get(file)
        if h is None:
            h = self._handles[file] = _open(self.path / file)
        return h

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype_name(self, name: str) -> str:
        return self._entry(name)["dtype"]

    def _entry(self, name: str) -> dict:
        try:
            return self._handle(self.weight_map[name]).entries[name]
        except KeyError:
            raise KeyError(f"{name}: not in {self.path} (its index maps it to {self.weight_map.get(name)})") from None

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor as stored (from the header: no read)."""
        n = 1
        for d in self.shape(name):
            n *= d
        return n * DTYPES[self.dtype_name(name)].itemsize

    # ---------------------------------------------------------------------------------- reading
    def get(self, name: str, device: str | torch.device = "cpu") -> Tensor:
        """One tensor (a copy in memory, on `device`); FP8 block-scaled weights come back dequantized (bf16)."""
        self._entry(name)  # a KeyError that names the file the index maps it to
        try:
            t = self._handle(self.weight_map[name]).get(name)
        except ShardError:
            raise
        except OSError as e:
            raise ShardError(f"{self.path / self.weight_map[name]}: reading {name} failed ({type(e).__name__}: {e}); "
                             "the file is truncated or corrupt") from None
        if t.dtype in _FP8 and self.fp8_block and (name + "_scale_inv") in self.weight_map:
            scale = self._handle(self.weight_map[name + "_scale_inv"]).get(name + "_scale_inv")
            t = dequantize_fp8_blocks(t, scale, self.fp8_block)
        return t.to(device)

    def stored(self, name: str) -> StoredTensor | None:
        """Where `name` is stored (for a file-to-file copy), or None when reading changes it (FP8 block-scaled
        weights are dequantized by get)."""
        st = self._handle(self.weight_map[name]).stored(name)
        if st.dtype in _FP8 and self.fp8_block and (name + "_scale_inv") in self.weight_map:
            return None
        return st

    def get_many(self, names: Iterable[str], device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """Several tensors, read file by file."""
        names = list(names)
        order = sorted(names, key=lambda n: (self.weight_map[n], n))
        return {n: self.get(n, device) for n in order}

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.weight_map)

    def close_file(self, file: str) -> None:
        """Close one shard file (reopened if read again)."""
        h = self._handles.pop(file, None)
        if h is not None:
            h.close()

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()


def dequantize_fp8_blocks(w: Tensor, scale_inv: Tensor, block: list[int] | tuple[int, int]) -> Tensor:
    """w float8 [out, in] with one scale per [bo, bi] block (scale_inv [ceil(out/bo), ceil(in/bi)],
    DeepSeek-V3's `weight_scale_inv`: w_real = w * scale_inv) -> bf16 [out, in]."""
    bo, bi = int(block[0]), int(block[1])
    out_f, in_f = w.shape
    s = scale_inv.float().repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]  # [out, in]
    return (w.float() * s).to(torch.bfloat16)
