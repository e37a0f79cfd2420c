"""Optuna storages: opening one from a URL (or a clear error within seconds), and the lock
that makes "check the budget, then create a trial" atomic between workers.

The lock lives where the storage lives. For a local store (SQLite, journal file) it is a
file lock beside the file: every worker is on this machine. For a database server it is a
session-level advisory lock in the database itself (PostgreSQL ``pg_advisory_lock``, MySQL
``GET_LOCK``), so it holds across machines, and the server drops it when a worker's
connection ends: a killed worker cannot keep it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna

from ..errors import TopoCAMError
from ..stores import DEFAULT_RUNS_DIR, FileLock, StoreURL, parse_store_url, sqlite_url

SUPPORTED = "sqlite:///path.db, postgresql://user:pw@host:port/db, mysql://... or journal:/path.log"


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


def open_storage(url: str, grace_period: int | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL, or a clear error within seconds.

    ``sqlite:///PATH`` (the default, one machine), ``postgresql://USER@HOST:PORT/DB`` (many
    machines), ``journal:PATH`` (Optuna's ``JournalStorage`` on a ``JournalFileBackend``:
    several processes on one machine without a server, no SQLite write contention).

    ``grace_period`` (seconds) turns Optuna's heartbeat on (SQLite and database servers; Optuna's
    journal storage has none): what a worker running trials opens; readers leave it out."""
    store = parse_store_url(url)
    try:
        with quiet_experimental():
            if store.kind == "sqlite":
                _check_folder(store, url)
                # schema creation is not safe between processes (two workers on a fresh file:
                # "table study_directions already exists"): create or check it under the store's lock
                with FileLock(store.lock_path):
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
                return optuna.storages.JournalStorage(JournalFileBackend(str(store.path)))
    except TopoCAMError:
        raise
    except Exception as exc:  # sqlalchemy/driver errors: all mean "cannot open this storage"
        msg = (str(exc).splitlines() or [""])[0][:300]
        raise TopoCAMError(f"cannot open Optuna storage {url!r} ({type(exc).__name__}: {msg}); check --storage") from None
    raise TopoCAMError(f"unsupported storage URL {url!r}; use {SUPPORTED}")


def _check_folder(store: StoreURL, url: str) -> None:
    assert store.path is not None
    if not store.path.parent.is_dir():
        raise TopoCAMError(f"storage {url!r}: folder {store.path.parent} does not exist; create it or choose another --storage")


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
