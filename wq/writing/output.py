"""Where a checkpoint goes: checked before any model is loaded, replaced only once the new one is complete.

- `check_output` (called by the CLI before the model loads): the output path is not the working directory
  or one of its parents, not the model being read, not a file; an existing directory is replaced only with
  --overwrite, and only if wq wrote it unless the user also says --overwrite-non-checkpoint; the nearest
  existing parent is a directory we can write in; its file system has room for the estimated checkpoint.
- `swap_in` (called by wq.io.atomic_dir once the new checkpoint is complete): the old directory is renamed
  aside, the new one renamed in, then the old one deleted. No failure can lose both.
- `failure_note`: what a run that failed late (disk full, Ctrl-C) kept, and how to continue it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

WQ_JSON = "wq.json"
MARGIN = 1.10  # the size estimate is close (headers and config); this covers tokenizer files and rounding
MARGIN_BYTES = 16 * 1024**2


class OutputError(UserError):
    """The output location cannot take the checkpoint (the message says why and what to do)."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def is_checkpoint(path: Path) -> bool:
    """A directory wq wrote: wq.json at its top, or every entry a format subdirectory wq wrote (several
    --format) or the eval/ reports of --eval."""
    if (path / WQ_JSON).is_file():
        return True
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    subdirs = [e for e in entries if e.is_dir() and (e / WQ_JSON).is_file()]
    return bool(subdirs) and all(e in subdirs or (e.name == "eval" and e.is_dir()) for e in entries)


def _listing(path: Path, n: int = 3) -> str:
    names = sorted(e.name + ("/" if e.is_dir() else "") for e in path.iterdir())
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def nearest_existing(path: Path) -> Path:
    """`path` itself, or its nearest ancestor that exists."""
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def check_not_working_dir(path: str | os.PathLike, flag: str = "-o") -> None:
    """Replacing the working directory (or one above it) would delete what the user is working in."""
    target = Path(os.path.realpath(Path(path).expanduser()))
    cwd = Path(os.path.realpath(os.getcwd()))
    if target == cwd or target in cwd.parents:
        where = "the current directory" if target == cwd else f"a parent of the current directory ({cwd})"
        raise OutputError(f"{flag} {path} is {where}: wq writes a new directory there and replaces it as a whole; "
                          f"give a new directory, e.g. {flag} out/checkpoint")


def check_output(path: str | os.PathLike | None, *, overwrite: bool = False, overwrite_non_checkpoint: bool = False,
                 needed_bytes: int | None = None, protect: tuple[str | os.PathLike, ...] = (),
                 flag: str = "-o") -> None:
    """Raise OutputError (one line that names the fix) if a checkpoint of about `needed_bytes` cannot be written
    to `path`. Nothing is created or changed. `protect`: paths (the model being read) the output must not replace."""
    if not path:
        raise OutputError(f"no output directory: pass {flag} OUT")
    out = Path(path).expanduser()
    check_not_working_dir(out, flag)
    real = Path(os.path.realpath(out))
    for p in protect:
        src = Path(os.path.realpath(Path(p).expanduser()))
        if real == src or real in src.parents:
            raise OutputError(f"{flag} {path} would replace the model being read ({p}); choose another {flag}")
    replacing = False
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"{flag} {path} exists and is not a directory; remove it or choose another {flag}")
        if any(out.iterdir()):
            if not overwrite:
                raise OutputError(f"output {path} exists; pass --overwrite to replace it (the old one is deleted only "
                                  f"after the new one is complete), or choose another {flag}")
            if not is_checkpoint(out) and not overwrite_non_checkpoint:
                raise OutputError(f"output {path} exists and is not a wq checkpoint (it holds {_listing(out)}); "
                                  f"--overwrite replaces only directories wq wrote: choose another {flag}, or add "
                                  "--overwrite-non-checkpoint to replace it and everything in it")
            replacing = True
    parent = nearest_existing(out.parent if out.exists() else out)
    if not parent.is_dir():
        raise OutputError(f"cannot create {path}: {parent} is a file, not a directory; choose another {flag}")
    try:  # a real probe: permissions, read-only mounts and full inode tables all show here
        os.rmdir(tempfile.mkdtemp(prefix=".wq-probe-", dir=parent))
    except OSError as e:
        raise OutputError(f"cannot write in {parent} ({e.strerror or e}); choose another {flag} or fix its "
                          "permissions") from None
    if needed_bytes:
        need = int(needed_bytes * MARGIN) + MARGIN_BYTES
        free = shutil.disk_usage(parent).free
        if free < need:
            both = " (the old checkpoint stays until the new one is complete, so both must fit)" if replacing else ""
            raise OutputError(f"not enough space for {path}: about {human_bytes(need)} needed (estimated from the "
                              f"model's tensor shapes and the scheme, +10%){both}, {human_bytes(free)} free in "
                              f"{parent}; free some space or choose another {flag}")


def swap_in(new: Path, out: Path) -> None:
    """Move the complete directory `new` to `out`. An existing `out` is renamed aside first and deleted last;
    if the move fails it is put back. Same file system (a sibling of `out`) expected."""
    if not out.exists() and not out.is_symlink():
        os.replace(new, out)
        return
    check_not_working_dir(out)
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(aside)  # a unique free name next to out
    os.rename(out, aside)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(aside, out)  # the old checkpoint goes back where it was
        raise
    try:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        else:
            aside.unlink()
    except OSError as e:
        log.warning("the new checkpoint is in %s; the old one could not be deleted and is kept in %s (%s): "
                    "delete it by hand", out, aside, e)


def partial_dir(output: str | os.PathLike) -> Path:
    """The resume directory of a calibrated run (wq.calib writes it beside the output)."""
    return Path(str(output).rstrip("/") + ".partial")


def failure_note(output: str | os.PathLike | None, *, resumable: bool = True) -> str:
    """What a failed or interrupted run left behind and how to continue: for the end of an error line.
    resumable: the run keeps finished blocks in <output>.partial (calibrated and streamed runs do)."""
    if not output:
        return ""
    out = Path(output)
    kept = (f"{output} is unchanged" if out.exists() else f"nothing was written to {output}")
    partial = partial_dir(output)
    if resumable and (partial / "state.json").exists():
        return (f"{kept}; the finished blocks are kept in {partial} ({human_bytes(dir_bytes(partial))}): rerun the "
                "same command with --resume to continue from there")
    return f"{kept}; rerun the same command once the cause is fixed"


def is_environment_error(exc: BaseException) -> bool:
    """Failures of the machine rather than of wq: disk full, permissions, out of memory (and the same raised by
    safetensors, whose errors are not OSErrors)."""
    if isinstance(exc, OSError | MemoryError):
        return True
    name = type(exc).__name__
    text = str(exc)
    return name == "OutOfMemoryError" or (name == "SafetensorError" and ("os error" in text or "No space" in text))


# what each field of the resume fingerprint (wq.calib's state.json) is set by on the command line
RESUME_FIELDS = {"algo": "--algo", "plan": "--scheme/--skip/--override", "calib": "--calib",
                 "samples": "--nsamples/--seqlen", "samples_sum": "--calib/--seed/--nsamples/--seqlen",
                 "blocks": "MODEL"}


def _v(x) -> str:
    return "default" if x is None else str(x)


class ResumeMismatchError(UserError, ValueError):
    """--resume with flags other than the interrupted run's."""


def resume_mismatch(directory: str | os.PathLike, before: dict, now: dict) -> ResumeMismatchError:
    """The error for a resume directory made with other settings, naming the flags (not the fingerprint's
    field names) and, for single values, what they were and are."""
    diffs: list[str] = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if old == new:
            continue
        if key == "settings" and isinstance(old, dict) and isinstance(new, dict):
            for k in sorted(set(old) | set(new)):
                if old.get(k) != new.get(k):
                    diffs.append(f"--{k.replace('_', '-')} ({_v(old.get(k))} then, {_v(new.get(k))} now)")
        elif key in RESUME_FIELDS and key not in ("plan", "samples_sum") and not isinstance(old, dict | list):
            diffs.append(f"{RESUME_FIELDS[key]} ({_v(old)} then, {_v(new)} now)")
        else:
            diffs.append(RESUME_FIELDS.get(key, key))
    return ResumeMismatchError(f"--resume: {directory} was made with other settings: {'; '.join(dict.fromkeys(diffs))}. "
                               "Rerun with the interrupted run's flags to continue it, or without --resume to start "
                               f"over (that deletes {directory})")


def occupied(path: str | os.PathLike) -> bool:
    """True if writing `path` would replace something: a file, or a directory that is not empty."""
    p = Path(path)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        return True
    return p.is_dir() and any(p.iterdir())


def refuse_occupied(path: str | os.PathLike, overwrite: bool) -> None:
    """The API's guard (the CLI checks more, see check_output): an occupied `path` needs overwrite=True."""
    if occupied(path) and not overwrite:  # an empty directory is filled
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) or choose another -o")
