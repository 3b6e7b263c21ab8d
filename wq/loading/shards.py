"""Read a checkpoint's tensors one at a time from its safetensors shards, never the whole model.

    src = ShardReader.open("meta-llama/Llama-3.1-8B")     # a hub id (downloaded by huggingface_hub) or a dir
    src.names()                                            # every tensor name, from the index / headers only
    w = src.get("model.layers.3.mlp.up_proj.weight")       # one tensor, read through a memory map

Any number of shards and any sharding (a block split across files is fine): the index (or each
file's header) says which file holds which tensor. Sources stored in FP8 with block scales
(DeepSeek-V3/R1, several Qwen3 releases: `X.weight` float8_e4m3 beside `X.weight_scale_inv`
[ceil(out/B), ceil(in/B)], `quantization_config.weight_block_size` [B, B]) are dequantized on read,
so their companions never show up as tensors: what a caller sees is a plain bf16/fp32 checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..errors import UserError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_FP8 = {torch.float8_e4m3fn, torch.float8_e5m2}


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


def _open(file: Path):
    try:
        return safe_open(str(file), "pt")
    except Exception as e:  # a truncated or corrupt shard: say which file and what is wrong
        raise ShardError(f"{file}: cannot read safetensors ({type(e).__name__}: {e}); the file is truncated or "
                         "corrupt: download it again") from None


class ShardReader:
    """Lazy, per-tensor access to the tensors of a local safetensors checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.weight_map = _weight_map(self.path)
        self._handles: dict[str, object] = {}
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
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self._handle(self.weight_map[name]).get_slice(name).get_dtype()

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor as stored (from the header: no read)."""
        sizes = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
                 "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
        n = 1
        for d in self.shape(name):
            n *= d
        return n * sizes.get(self.dtype_name(name), 4)

    # ---------------------------------------------------------------------------------- reading
    def get(self, name: str, device: str | torch.device = "cpu") -> Tensor:
        """One tensor (a copy in memory, on `device`); FP8 block-scaled weights come back dequantized (bf16)."""
        try:
            t = self._handle(self.weight_map[name]).get_tensor(name)
        except KeyError:
            raise KeyError(f"{name}: not in {self.path} (its index maps it to {self.weight_map.get(name)})") from None
        except Exception as e:
            raise ShardError(f"{self.path / self.weight_map[name]}: reading {name} failed ({type(e).__name__}: {e}); "
                             "the file is truncated or corrupt") from None
        if t.dtype in _FP8 and self.fp8_block and (name + "_scale_inv") in self.weight_map:
            scale = self._handle(self.weight_map[name + "_scale_inv"]).get_tensor(name + "_scale_inv")
            t = dequantize_fp8_blocks(t, scale, self.fp8_block)
        return t.to(device)

    def get_many(self, names: Iterable[str], device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """Several tensors, read file by file."""
        names = list(names)
        order = sorted(names, key=lambda n: (self.weight_map[n], n))
        return {n: self.get(n, device) for n in order}

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.weight_map)

    def close(self) -> None:
        self._handles.clear()


def dequantize_fp8_blocks(w: Tensor, scale_inv: Tensor, block: list[int] | tuple[int, int]) -> Tensor:
    """w float8 [out, in] with one scale per [bo, bi] block (scale_inv [ceil(out/bo), ceil(in/bi)],
    DeepSeek-V3's `weight_scale_inv`: w_real = w * scale_inv) -> bf16 [out, in]."""
    bo, bi = int(block[0]), int(block[1])
    out_f, in_f = w.shape
    s = scale_inv.float().repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]  # [out, in]
    return (w.float() * s).to(torch.bfloat16)
