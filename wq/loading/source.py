"""Where the model comes from, checked before anything is loaded: the bundled default, a local directory, or a
Hub id. Every failure is one line that says what was tried and what to do.

- A local directory must hold config.json and weights; its safetensors files are checked by their headers
  (truncated, corrupt, missing shards named; wq.loading.headers).
- An argument that looks like a path (./x, /x, ~/x, x/y/z, or whose first part exists here) and does not exist
  is reported as a missing local path, not looked up on the Hub.
- A Hub id is looked up in the local Hub cache first; if it is not there, the Hub is probed once (a few
  seconds at most) instead of letting each file request retry for a minute when there is no network. When
  the Hub cannot be reached, offline mode is switched on for the rest of the process.
- The tokenizer is optional for runs that need no text (rtn, FP8): a directory without tokenizer files is
  loaded without one.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UserError
from .headers import check_shards

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "spiece.model", "vocab.txt", "tekken.json", "chat_template.jinja")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gpt2", "org/name"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
PROBE_SECONDS = 3.0


class ModelSourceError(UserError):
    """The model argument cannot be loaded (the message says why and what to do)."""


@dataclass(frozen=True)
class ModelSource:
    spec: str | None  # as the user gave it
    path: str  # what from_pretrained gets: a local directory or a Hub id
    local: bool
    has_tokenizer: bool | None  # None: not known before loading (a Hub id)


def looks_like_path(spec: str) -> bool:
    """A string the user meant as a local path: starts with . / ~, has a backslash or more than one slash, or
    its first part is a directory here (a mistyped local path without ./)."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1 or not HUB_ID.match(spec):
        return True
    head = spec.split("/", 1)[0]
    return "/" in spec and os.path.isdir(head)


def has_tokenizer_files(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return any((d / f).is_file() for f in TOKENIZER_FILES)


def check_local_model(directory: str | os.PathLike, spec: str | None = None) -> None:
    """config.json, weights, and complete safetensors files (headers only); ModelSourceError / ShardError."""
    d = Path(directory)
    name = spec or str(d)
    if not (d / "config.json").is_file():
        subdirs = sorted(x.name for x in d.iterdir() if (x / "config.json").is_file())
        hint = (f"; it holds the formats {', '.join(subdirs)}: give {name.rstrip('/')}/<format>" if subdirs else
                "; give a Hugging Face model directory (config.json + weights) or a Hub id")
        raise ModelSourceError(f"model {name}: no config.json in {d}{hint}")
    if not any((d / f).is_file() for f in WEIGHT_FILES):
        raise ModelSourceError(f"model {name}: no weights in {d} (none of {', '.join(WEIGHT_FILES)})")
    check_shards(d)


def _close_names(path: Path) -> str:
    import difflib

    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return ""
    close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir() if p.is_dir()], n=3)
    return f" (did you mean {', '.join(str(parent / c) for c in close)}?)" if close else ""


@functools.lru_cache(maxsize=1)
def hub_unreachable(timeout: float = PROBE_SECONDS) -> str | None:
    """None if the Hub endpoint answers a TCP connect within `timeout` s, else why not. One attempt, cached."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    result: list[str | None] = ["timed out"]

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result[0] = None
        except OSError as e:
            result[0] = e.strerror or str(e) or type(e).__name__

    t = threading.Thread(target=probe, daemon=True)  # a thread: name resolution itself ignores timeouts
    t.start()
    t.join(timeout)
    return None if result[0] is None else f"{host}: {result[0]}"


def go_offline() -> None:
    """Offline mode for the rest of the process: cached files load without a minute of retried requests."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def _cached(repo_id: str, revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return isinstance(hit, str)


def resolve_source(spec: str | None, revision: str | None = None) -> ModelSource:
    """The bundled default, a checked local directory, or a Hub id that is cached or reachable."""
    from ..assets import DEFAULT_MODEL, resolve_model

    if spec in (None, "", DEFAULT_MODEL):
        path = resolve_model(None)
        return ModelSource(spec, path, True, has_tokenizer_files(path))
    p = Path(spec).expanduser()
    if p.is_dir():
        check_local_model(p, spec)
        return ModelSource(spec, str(p), True, has_tokenizer_files(p))
    if p.exists():
        raise ModelSourceError(f"model {spec} is a file; give the model's directory (config.json + weights) or a Hub id")
    if looks_like_path(spec):
        raise ModelSourceError(f"model {spec}: no such local directory ({p.absolute()}){_close_names(p)}")
    if _cached(spec, revision):
        if hub_unreachable():
            go_offline()
            log.info("the Hub is unreachable; using the cached copy of %s", spec)
        return ModelSource(spec, spec, False, None)
    why = hub_unreachable()
    if why:
        raise ModelSourceError(f"model {spec} is not a local directory nor in the Hub cache, and the Hub cannot be "
                               f"reached ({why}); connect to the network, or download the model elsewhere and "
                               "pass its directory")
    check_on_hub(spec, revision)
    return ModelSource(spec, spec, False, None)


def check_on_hub(repo_id: str, revision: str | None = None) -> None:
    """One request: the repository (and revision) exists and this user may read it; ModelSourceError otherwise."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(repo_id, revision=revision, timeout=10)
    except RevisionNotFoundError:
        raise ModelSourceError(f"model {repo_id}: the Hub has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ModelSourceError(f"model {repo_id}: no such model on the Hub (or it is private: log in with `hf auth "
                               "login`); a local directory needs a path that exists") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelSourceError(f"model {repo_id}: the Hub did not answer ({' '.join(str(e).split())[:200]})") from None


def load_tokenizer(source: ModelSource, *, required: bool, why: str = ""):
    """The model's tokenizer, or None when it has none and `required` is False (logged). ModelSourceError when a
    required one is missing or fails to load."""
    from transformers import AutoTokenizer

    if source.local and not source.has_tokenizer:
        if required:
            raise ModelSourceError(f"model {source.spec or source.path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}"
                                   f", ...){why}; copy the tokenizer files into {source.path}")
        log.warning("%s has no tokenizer files: the checkpoint is written without one (copy them in to use it "
                    "with text)", source.path)
        return None
    try:
        return AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError, ImportError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if required:
            raise ModelSourceError(f"cannot load the tokenizer of {source.spec or source.path}{why}: {msg}") from None
        log.warning("the tokenizer of %s does not load (%s): the checkpoint is written without one", source.path, msg)
        return None
