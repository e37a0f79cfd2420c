"""Optuna storages: opening one from a URL (or a clear error within seconds), the lock
that makes "check the budget, then create a trial" atomic between workers, and what a
worker says when a store fails mid-study (:func:`infrastructure_error`).

The lock lives where the storage lives. For a local store (SQLite, journal file) it is a
file lock beside the file: every worker is on this machine. For a database server it is a
session-level advisory lock in the database itself (PostgreSQL ``pg_advisory_lock``, MySQL
``GET_LOCK``), so it holds across machines, and the server drops it when a worker's
connection ends: a killed worker cannot keep it.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna

from ..core.errors import InfrastructureError, TopoCAMError
from ..core.locks import FileLock
from ..stores import (
    DEFAULT_RUNS_DIR, StoreURL, not_writable, parse_store_url, redact_url, sqlite_read_only, sqlite_tables, sqlite_url,
    write_refused,
)

SUPPORTED = "sqlite:///path.db, postgresql://user:pw@host:port/db, mysql://... or journal:/path.log"
OPTUNA_TABLES = frozenset({"studies", "version_info"})  # what any Optuna RDB storage holds
NO_STORAGE = "run a study first or pass --storage"


@contextmanager
def quiet_experimental() -> Iterator[None]:
    """Heartbeats and ``fail_stale_trials`` are marked experimental by Optuna: not the user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def default_storage(runs_dir: Path = DEFAULT_RUNS_DIR) -> str:
    return sqlite_url(Path(runs_dir) / "optuna.db")


MAX_RETRY = 3  # a configuration whose worker dies every time is re-run at most this often


def retry_callback() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    """Optuna's retry (``RetryFailedTrialCallback`` before Optuna 4.9): a trial lost with its
    worker is re-queued as a WAITING trial with the same parameters (``failed_trial`` names it)."""
    with quiet_experimental():
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


def _heartbeat(grace_period: int | None) -> dict[str, Any]:
    """RDBStorage keywords: a heartbeat every ``grace_period // 4`` seconds; a RUNNING trial
    silent for ``grace_period`` is failed (by the next worker that looks) and re-queued."""
    if grace_period is None:
        return {}
    return {"heartbeat_interval": max(1, grace_period // 4), "grace_period": grace_period,
            "heartbeat_stale_trial_callback": retry_callback()}


def open_storage(url: str, grace_period: int | None = None, read_only: bool = False) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL, or a clear error within seconds.

    ``sqlite:///PATH`` (the default, one machine), ``postgresql://USER@HOST:PORT/DB`` (many
    machines), ``journal:PATH`` (Optuna's ``JournalStorage`` on a ``JournalFileBackend``:
    several processes on one machine without a server, no SQLite write contention).

    ``grace_period`` (seconds) turns Optuna's heartbeat on (SQLite and database servers; Optuna's
    journal storage has none): what a worker running trials opens; readers leave it out.

    ``read_only``: what a look-up opens (``study status``, ``export``, ``ablate``): a storage that
    is not there is an error naming it, never created; no lock file is made and an SQLite file is
    opened read-only, so a storage on a read-only file or folder can be read. A worker's storage
    (not ``read_only``) must be writable, or a one-line error says what is not."""
    store = parse_store_url(url)
    if read_only:
        return _open_read_only(store, url)
    try:
        with quiet_experimental():
            if store.kind == "sqlite":
                _check_folder(store, url)
                _check_writable(store)
                # schema creation is not safe between processes (two workers on a fresh file:
                # "table study_directions already exists"): create or check it under the store's lock
                with _writing(store), FileLock(store.lock_path):
                    return optuna.storages.RDBStorage(
                        store.url, engine_kwargs={"connect_args": {"timeout": 60}}, **_heartbeat(grace_period)
                    )
            if store.is_database_server:
                # two workers creating the schema together collide in the server's catalogue
                # ("duplicate key value violates unique constraint pg_type_typname_nsp_index"):
                # create or check it under a lock in that database
                import sqlalchemy

                kwargs = {"connect_args": {"connect_timeout": 5}, "pool_pre_ping": True}
                engine = sqlalchemy.create_engine(store.url, poolclass=sqlalchemy.pool.NullPool, **kwargs)
                try:
                    with DatabaseLock(engine, "topocam:schema"):
                        return optuna.storages.RDBStorage(store.url, engine_kwargs=kwargs, **_heartbeat(grace_period))
                finally:
                    engine.dispose()
            if store.kind == "journal":
                from optuna.storages.journal import JournalFileBackend

                _check_folder(store, url)
                _check_writable(store)
                with _writing(store):
                    return optuna.storages.JournalStorage(JournalFileBackend(str(store.path)))
    except TopoCAMError:
        raise
    except Exception as exc:  # sqlalchemy/driver errors: all mean "cannot open this storage"
        raise _cannot_open(url, exc) from None
    raise TopoCAMError(f"unsupported storage URL {url!r}; use {SUPPORTED}")


def _cannot_open(url: str, exc: BaseException) -> TopoCAMError:
    msg = (str(exc).splitlines() or [""])[0][:300]
    return TopoCAMError(f"cannot open Optuna storage {url!r} ({type(exc).__name__}: {msg}); check --storage")


def _open_read_only(store: StoreURL, url: str) -> optuna.storages.BaseStorage:
    """``open_storage(url, read_only=True)``: an existing storage, opened without writing to it."""
    try:
        with quiet_experimental():
            if store.kind in ("sqlite", "journal"):
                assert store.path is not None
                if not store.path.is_file():
                    raise TopoCAMError(f"no study storage at {store.path}; {NO_STORAGE}")
            if store.kind == "sqlite":
                tables = sqlite_tables(store.path)
                if tables is None or not OPTUNA_TABLES <= tables:
                    what = "not an SQLite database" if tables is None else "no Optuna tables in it"
                    raise TopoCAMError(f"no study storage at {store.path} ({what}); {NO_STORAGE}")
                return optuna.storages.RDBStorage(store.url, engine_kwargs={"creator": sqlite_read_only(store.path)},
                                                  skip_table_creation=True)
            if store.is_database_server:
                import sqlalchemy

                kwargs = {"connect_args": {"connect_timeout": 5}, "pool_pre_ping": True}
                engine = sqlalchemy.create_engine(store.url, poolclass=sqlalchemy.pool.NullPool, **kwargs)
                try:
                    tables = set(sqlalchemy.inspect(engine).get_table_names())
                finally:
                    engine.dispose()
                if not OPTUNA_TABLES <= tables:
                    raise TopoCAMError(f"no study storage in {redact_url(url)} (the database holds no Optuna tables); {NO_STORAGE}")
                return optuna.storages.RDBStorage(store.url, engine_kwargs=kwargs, skip_table_creation=True)
            if store.kind == "journal":
                from optuna.storages.journal import JournalFileBackend

                return optuna.storages.JournalStorage(JournalFileBackend(str(store.path)))
    except TopoCAMError:
        raise
    except Exception as exc:  # sqlalchemy/driver errors: all mean "cannot open this storage"
        raise _cannot_open(url, exc) from None
    raise TopoCAMError(f"unsupported storage URL {url!r}; use {SUPPORTED}")


def _check_folder(store: StoreURL, url: str) -> None:
    assert store.path is not None
    if not store.path.parent.is_dir():
        raise TopoCAMError(f"storage {url!r}: folder {store.path.parent} does not exist; create it or choose another --storage")


def _read_only_storage(store: StoreURL, why: str) -> TopoCAMError:
    return TopoCAMError(
        f"cannot write the Optuna storage {store.path}: {why}; a study's workers write their trials (and a lock) there, so "
        "pass a writable --storage or --runs-dir (`topocam study status` reads it without write access)"
    )


def _check_writable(store: StoreURL) -> None:
    why = not_writable(store.path)
    if why is not None:
        raise _read_only_storage(store, why)


@contextmanager
def _writing(store: StoreURL) -> Iterator[None]:
    """A write the OS refuses while opening (the lock file, the journal: a folder ``os.access``
    judged writable, say over NFS) is the same one-line error as one found beforehand."""
    try:
        yield
    except OSError as exc:
        if write_refused(exc):
            raise _read_only_storage(store, f"{exc.filename or store.path}: {exc.strerror}") from None
        raise


class DatabaseLock:
    """A named, exclusive, session-level advisory lock in the storage's database server;
    the same ``acquire``/``release``/``with`` interface as :class:`FileLock`."""

    def __init__(self, engine: Any, name: str):
        self.engine = engine
        self.name = name
        self.key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self._conn: Any = None

    def _sql(self, lock: bool) -> tuple[str, dict[str, Any]]:
        if self.engine.dialect.name == "postgresql":
            return ("SELECT pg_advisory_lock(:k)" if lock else "SELECT pg_advisory_unlock(:k)"), {"k": self.key}
        return ("SELECT GET_LOCK(:n, -1)" if lock else "SELECT RELEASE_LOCK(:n)"), {"n": self.name[:64]}

    def acquire(self) -> "DatabaseLock":
        if self._conn is not None:
            return self
        from sqlalchemy import text

        conn = self.engine.connect()
        try:
            conn.execute(text(self._sql(True)[0]), self._sql(True)[1])
            conn.commit()
        except BaseException:
            conn.invalidate()
            conn.close()
            raise
        self._conn = conn
        return self

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        from sqlalchemy import text

        try:
            conn.execute(text(self._sql(False)[0]), self._sql(False)[1])
            conn.commit()
        except Exception:  # the connection is gone: so is its lock; never pool it
            conn.invalidate()
        finally:
            conn.close()

    def __enter__(self) -> "DatabaseLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def storage_lock(storage_url: str, storage: optuna.storages.BaseStorage, name: str) -> FileLock | DatabaseLock:
    """The lock named ``name`` for workers sharing this storage (see the module doc)."""
    store = parse_store_url(storage_url)
    if store.is_database_server:
        return DatabaseLock(storage.engine, f"topocam:{name}")
    return FileLock(store.lock_path)


# ------------------------------------------------------------ a store failing mid-study

# Where an exception comes from says which store failed: MLflow's client (and the HTTP stack
# under it) is the tracking store; Optuna and the database drivers under it are the storage.
_STORE_OF_MODULE = {"mlflow": "tracking", "requests": "tracking", "urllib3": "tracking",
                    "optuna": "storage", "sqlalchemy": "storage", "psycopg": "storage", "sqlite3": "storage"}
_WHAT = {"tracking": "the MLflow tracking store", "storage": "the Optuna storage", "disk": "the disk"}


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return out


def failed_store(exc: BaseException) -> str | None:
    """``"tracking"``, ``"storage"`` or ``"disk"``: the store whose failure ``exc`` reports, or None.
    The whole chain is read: Optuna, its storage gone, can raise an error of its own (Optuna 5.0:
    ``UnboundLocalError`` in ``_run_trial``) while handling the driver's."""
    for e in _chain(exc):
        kind = _STORE_OF_MODULE.get(type(e).__module__.split(".")[0])
        if kind is not None:
            return kind
    return "disk" if isinstance(exc, OSError) else None


def _innermost(exc: BaseException) -> str:
    """``Type: first line`` of the innermost error of the chain that has words: the driver's."""
    root = next((e for e in reversed(_chain(exc)) if str(e).strip()), exc)
    words = next((ln.strip() for ln in str(root).splitlines() if ln.strip()), "")
    return f"{type(root).__name__}: {words}"[:300]


def infrastructure_error(exc: BaseException, storage_url: str, tracking_uri: str | None) -> InfrastructureError | None:
    """The failure of a store or of the disk as one line: which store, the driver's own words
    (the innermost error: "Connection refused", not a wrapper's guess), and what to do.
    None: ``exc`` is not one."""
    kind = failed_store(exc)
    if kind is None:
        return None
    url = {"tracking": tracking_uri or "", "storage": storage_url, "disk": ""}[kind]
    what = _WHAT[kind]
    path = parse_store_url(url).path if url else None
    if path is not None and not path.exists():  # SQLite then says "attempt to write a readonly database"
        why = f"its file {path} was deleted while the study ran"
    else:
        why = _innermost(exc)
    return InfrastructureError(
        f"{what}{' ' + url if url else ''} failed ({why}); the study stopped. Finished trials are kept and the "
        "interrupted one does not count: run the same command again once the store is back"
    )


def _no_store_traceback(record: logging.LogRecord) -> bool:
    """Optuna logs a trial that a failing store interrupted with the traceback of the store's
    client: the study stops with one line that says what failed (:func:`infrastructure_error`)."""
    kind = failed_store(record.exc_info[1]) if record.exc_info and record.exc_info[1] is not None else None
    if kind is not None:
        head = record.getMessage().split(" because of the following error:")[0]  # "Trial 2 failed with parameters: {...}"
        record.msg, record.args = f"{head}: {_WHAT[kind]} failed (the last line says how)", ()
        record.exc_info = record.exc_text = None
    return True


logging.getLogger("optuna.study._optimize").addFilter(_no_store_traceback)

_thread_excepthook = threading.excepthook


def _quiet_heartbeat_failure(args: threading.ExceptHookArgs) -> None:
    """Optuna's heartbeat thread dies with a traceback when the storage fails; one line says it
    instead. The trial goes on (its worker stops with the storage's error at its end, if the
    storage is still gone), but it sends no more heartbeats: past the grace period another
    worker may take it for lost and run it again."""
    frames = traceback.extract_tb(args.exc_traceback) if args.exc_traceback is not None else []
    in_heartbeat = any(Path(f.filename).parts[-3:] == ("optuna", "storages", "_heartbeat.py") for f in frames)
    if in_heartbeat and args.exc_value is not None and failed_store(args.exc_value):
        print(f"warning: the Optuna storage failed to record this worker's heartbeat ({_innermost(args.exc_value)}); "
              "the trial goes on without one", file=sys.stderr, flush=True)
        return
    _thread_excepthook(args)


threading.excepthook = _quiet_heartbeat_failure
