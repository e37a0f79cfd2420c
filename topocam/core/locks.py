"""The file lock that serialises processes sharing a local store or cache, and
:func:`load_or_build`, which uses it so that processes sharing a cache build
each entry once."""

from __future__ import annotations

import errno
import os
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .atomic import remove, temporaries_of
from .errors import CorruptCacheWarning, InfrastructureError, TopoCAMError

WAIT_NOTICE_S = 5.0  # a process waiting this long for another's cache entry says so, once
# what the OS says when a write is refused: permissions, or a read-only filesystem (all a root process meets)
WRITE_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)


class FileLock:
    """Exclusive ``flock`` on a file beside a local store, between processes and between
    threads (each acquisition opens the file anew); a no-op for ``None``. ``release``
    may be called early (the runner releases its claim once the trial exists).

    The holder writes its process id into the file. ``waiting``, if given, is called once
    with that id (None if unknown) when the lock has been held elsewhere for
    ``WAIT_NOTICE_S`` seconds, so a long wait can be said."""

    def __init__(self, path: Path | None, waiting: Callable[[int | None], None] | None = None):
        self.path = path
        self.waiting = waiting
        self._fh = None

    def acquire(self) -> "FileLock":
        if self.path is None or self._fh is not None:
            return self
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no inter-process lock
            return self
        fh = open(self.path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            notice = threading.Timer(WAIT_NOTICE_S, self._notice) if self.waiting is not None else None
            if notice is not None:
                notice.daemon = True
                notice.start()
            try:
                fcntl.flock(fh, fcntl.LOCK_EX)
            except BaseException:
                fh.close()
                raise
            finally:
                if notice is not None:
                    notice.cancel()
        fh.truncate(0)  # "a": the next write lands at 0
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def _notice(self) -> None:
        try:
            holder: int | None = int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            holder = None
        self.waiting(holder)

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


T = TypeVar("T")


class BadEntry(TopoCAMError):
    """Raised by a cache loader: the entry on disk must not be used (truncated,
    unreadable, wrong shape); :func:`load_or_build` names it and rebuilds it.
    A TopoCAMError so that one met elsewhere is a one-line message, not a traceback."""

    @classmethod
    def because(cls, exc: BaseException, where: str = "") -> "BadEntry":
        """One short line from a reader's exception (torch appends a paragraph of advice)."""
        text = str(exc).strip().split(". ")[0].splitlines()
        return cls(f"{where + ': ' if where else ''}{type(exc).__name__}: {text[0] if text else 'unreadable'}")


def load_or_build(entry: Path, load: Callable[[], T | None], build: Callable[[], T]) -> tuple[T, bool]:
    """The value of a cache entry and True if it was read back, False if ``build`` made it.

    ``load`` returns None when the entry is absent and raises :class:`BadEntry` when it
    is unusable; ``build`` writes the entry atomically (:func:`topocam.atomic.atomic_path`)
    and returns its value. Why the lock: workers sharing a machine share the cache, and
    without it each would train the same backbone and race to rename it into place.
    The first to take ``.<name>.lock`` builds; the others wait on it and then load what
    it built, saying so on stderr if that takes more than ``WAIT_NOTICE_S`` seconds (a
    backbone trains for minutes). An entry found good needs no lock (it only appears by a
    rename), so a read-only cache still serves; one that must be built there is an
    :class:`InfrastructureError` naming it and the folder, raised before ``build`` runs."""
    try:
        found = load()
        bad = None
    except BadEntry as exc:
        found, bad = None, exc  # judged again under the lock, where it is named and rebuilt
    if found is not None:
        return found, True
    lock = FileLock(entry.with_name(f".{entry.name}.lock"), waiting=lambda pid: _say_waiting(entry, pid))
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as exc:
        if exc.errno not in WRITE_REFUSED:
            raise
        state = f"is unusable ({bad})" if bad is not None else "is not built yet"
        folder = next(p for p in (entry.parent, *entry.parent.parents) if p.exists())  # where it would be made
        raise InfrastructureError(
            f"cache entry {entry} {state}, and building it needs write access to {folder} ({exc.strerror}); "
            "fill the cache once where it is writable, or choose a writable --cache-dir (or TOPOCAM_CACHE_DIR)"
        ) from None
    with lock:
        try:
            found = load()
        except BadEntry as exc:
            warnings.warn(CorruptCacheWarning(f"cache entry {entry} is unusable ({exc}); rebuilding it"), stacklevel=3)
        if found is not None:
            return found, True
        for stale in temporaries_of(entry):  # a killed builder's: no one else builds this entry now
            remove(stale)
        return build(), False


def _say_waiting(entry: Path, holder: int | None) -> None:
    by = f"another process (pid {holder})" if holder is not None else "another process"
    print(f"waiting for {by} to build {entry} ...", file=sys.stderr, flush=True)
