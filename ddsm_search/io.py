"""The ground every stage stands on: atomic file writes (a temporary name renamed into place), hashes,
JSON files read with one line saying what is wrong, and the one cache folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import DDSMError

CACHE_ENV = "DDSM_SEARCH_CACHE"


def cannot_write(path: str | os.PathLike, exc: OSError) -> DDSMError:
    """Return the one-line error of an OS error while writing `path` (permission denied, a full disk, a
    folder that cannot be made, such as one under /proc)."""
    return DDSMError(f"cannot write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    An OSError on the way (making the folder or the temporary file, writing, syncing, renaming) is
    raised as a DDSMError naming `path`; the temporary file is removed, so nothing that looks whole is left.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should read like any other file
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # flush to disk so a crash after rename leaves whole data
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call `writer(tmp_path)` and rename the result onto `path`; return `path`."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically; return `path`."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as indented JSON to `path` atomically; return `path`."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_text(path: str | os.PathLike, what: str = "", expected: str = "text") -> str:
    """Return the text of the file at `path`, or raise DDSMError naming the file (`what` it should be)
    and what is wrong: missing, unreadable, or not text (`expected` names the format it should hold)."""
    path = Path(path)
    if not path.is_file():
        raise DDSMError(f"{what + ' ' if what else ''}file not found: {path}")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise DDSMError(f"{what + ' ' if what else ''}{path}: not a text file (expected {expected})") from None
    except OSError as exc:
        raise DDSMError(f"{what + ' ' if what else ''}{path}: cannot be read ({exc.strerror or exc})") from None


def read_json(path: str | os.PathLike, what: str = "") -> dict:
    """Return the JSON object stored at `path`, or raise DDSMError naming the file (`what` it should be)
    and what is wrong: missing, unreadable, not text, not JSON, or not an object."""
    text = read_text(path, what, "JSON")
    name = f"{what} {path}" if what else str(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DDSMError(f"{name}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise DDSMError(f"{name}: expected a JSON object, got {type(data).__name__}")
    return data


def cache_dir() -> Path:
    """Return the folder for caches (reference statistics, full-size samples, backend timings, built
    kernels): $DDSM_SEARCH_CACHE, else $XDG_CACHE_HOME/ddsm-search, else ~/.cache/ddsm-search."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ddsm-search"
