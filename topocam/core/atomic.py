"""Write a file or a folder so that readers see the old content or the new, never half
of it: write a temporary path beside it, then rename it into place (``os.replace``).
A write that fails (disk full, an exception, Ctrl-C) leaves no temporary behind.

:func:`json_safe` is the project's one conversion of results to JSON data; every JSON
file written (tables, ``metrics.json``, a bundle's ``topocam.json``) goes through it."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any

import numpy as np

TMP_MARK = ".tmp"  # temporaries are ``.<name>.tmp<pid>``: hidden, and found by :func:`temporaries_of`


def _tmp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def temporaries_of(path: Path) -> list[Path]:
    """Temporaries of ``path`` left by any process (a kill -9 between write and rename)."""
    return sorted(Path(path).parent.glob(f".{Path(path).name}{TMP_MARK}*"))


def remove(path: Path) -> None:
    """Remove a file or a folder tree; absent is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit rename it onto ``path``.

    The caller writes a file there, or makes a folder and fills it. A folder already
    at ``path`` is moved aside first (``os.replace`` cannot overwrite a non-empty
    folder), so a reader finds the old entry, none, or the new one. Why a path and
    not bytes: ``torch.save`` and ``np.save`` write large arrays straight to disk."""
    path = Path(path)
    tmp = _tmp_for(path)
    remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = tmp.with_name(f"{tmp.name}.old")  # a temporary too: swept if we die here
            os.replace(path, old)
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
    finally:
        remove(tmp)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON data: numpy scalars and arrays as Python numbers and lists,
    tuples as lists, paths as strings, other numbers (``__float__``) as floats, and NaN and
    infinities as null, so that the text is strict JSON (jq, JavaScript). Dict keys that
    ``json`` cannot write become strings. Anything else is left as it is (``json.dumps``
    refuses it)."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.generic, np.ndarray)):
        return json_safe(obj.tolist())  # a numpy scalar's tolist() is its Python value
    if isinstance(obj, dict):
        return {_json_key(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    if hasattr(obj, "__float__"):
        return json_safe(float(obj))
    return obj


def _json_key(key: Any) -> Any:
    if isinstance(key, np.generic):
        key = key.item()
    return key if key is None or isinstance(key, (str, int, float, bool)) else str(key)


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as strict JSON (:func:`json_safe`), indented, written atomically."""
    write_text_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def _bytes_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def _chain(exc: BaseException | None):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


_NO_ROOM = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "the file is larger than this process may write (its file size limit, ulimit -f)",
}


def write_failure(exc: BaseException, folder: Path, size: int | None = None) -> str:
    """Why a write into ``folder`` failed, in words. A full device, a quota or a file size limit
    is said as such, with the file's approximate ``size`` if known and the space left there
    (torch's writer reports each of them as "[enforce fail at inline_container.cc] unexpected
    pos", raised from the OSError that says which); anything else is the error's own text."""
    os_error = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in _NO_ROOM), None)
    if os_error is None:
        return str(exc)
    facts = [f"it needs about {_bytes_text(size)}"] if size else []
    try:
        facts.append(f"{_bytes_text(shutil.disk_usage(folder).free)} free in {folder}")
    except OSError:
        pass
    return _NO_ROOM[os_error.errno] + (f"; {', '.join(facts)}" if facts else "")
