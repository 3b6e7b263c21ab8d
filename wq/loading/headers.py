"""The safetensors files of a model or checkpoint directory, read by their headers only (no tensor data).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data buffer,
which the header must cover exactly. Reading the headers gives every tensor's shape, dtype and size in
milliseconds, whatever the model's size: the checkpoint-size and memory estimates use them, and the
checks below name the file and the cause (truncated, corrupt, missing shard) before anything is loaded,
where safetensors itself says only "incomplete metadata, file not fully covered".
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .shards import ShardError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER = 100 * 1024**2  # safetensors' own limit on the JSON header

# bytes per element of each safetensors dtype (F4 packs two per byte)
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 0.5}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors' spelling: "BF16", "F32", "I32", ...
    shape: tuple[int, ...]
    nbytes: int
    file: str  # file name inside the directory ("" when the shape came from a config, not a file)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """{tensor name: TensorInfo} of one safetensors file; ShardError if it is truncated or corrupt."""
    path = Path(path)
    hint = "re-download or re-create it"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ShardError(f"{path} is truncated ({size} bytes, shorter than the 8-byte header length); {hint}")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ShardError(f"{path} is truncated or corrupt: its header length ({n:,} bytes) runs past the end "
                                 f"of the file ({size:,} bytes); {hint}")
            raw = f.read(n)
    except OSError as e:
        raise ShardError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{path} is corrupt: its header is not valid JSON ({e}); {hint}") from None
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in meta["data_offsets"])
            shape = tuple(int(d) for d in meta["shape"])
            dtype = str(meta["dtype"])
        except (KeyError, TypeError, ValueError):
            raise ShardError(f"{path} is corrupt: header entry {name!r} lacks dtype/shape/data_offsets; {hint}") from None
        out[name] = TensorInfo(name, dtype, shape, stop - begin, path.name)
        end = max(end, stop)
    data = size - 8 - n
    if data < end:
        raise ShardError(f"{path} is truncated: {size:,} bytes, its header describes {8 + n + end:,} "
                         f"({(8 + n + end - size):,} missing); {hint}")
    if data > end:
        raise ShardError(f"{path} is corrupt: {data - end:,} bytes after the last tensor its header describes; {hint}")
    return out


def shard_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files transformers would read from `directory`: the index's, or model.safetensors;
    [] when there are none (e.g. a pytorch_model.bin checkpoint). ShardError for a broken index."""
    d = Path(directory)
    index = d / INDEX
    if index.exists():
        return [d / f for f in sorted(set(_weight_map(index).values()))]
    if (d / SINGLE).exists():
        return [d / SINGLE]
    return []


def _weight_map(index: Path) -> dict[str, str]:
    try:
        wm = json.loads(index.read_text())["weight_map"]
        if not isinstance(wm, dict):
            raise ValueError("weight_map is not a mapping")
        return {str(k): str(v) for k, v in wm.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{index} is corrupt ({type(e).__name__}: {e}); re-download or re-create it") from None


def check_shards(directory: str | os.PathLike, files: Iterable[Path] | None = None) -> dict[str, TensorInfo]:
    """Every tensor of the directory's safetensors files, from their headers, after checking that each file the
    index names exists, is complete, and holds the tensors the index says it holds. ShardError otherwise."""
    d = Path(directory)
    index = d / INDEX
    files = list(files) if files is not None else shard_files(d)
    wm = _weight_map(index) if index.exists() else None
    if wm is not None:
        missing = sorted({f for f in wm.values() if not (d / f).exists()})
        if missing:
            n = sum(v in missing for v in wm.values())
            raise ShardError(f"{d}: {INDEX} lists {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                             f"({n} tensors) but the file is missing; the download or copy is incomplete")
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        tensors.update(read_header(f))
    if wm is not None:
        absent = [(k, v) for k, v in wm.items() if k not in tensors or tensors[k].file != v]
        if absent:
            k, v = absent[0]
            raise ShardError(f"{d}: {INDEX} says {k} is in {v}, which does not hold it ({len(absent)} such entries); "
                             "the index does not match the files: re-download or re-create the checkpoint")
    return tensors
