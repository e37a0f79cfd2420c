"""Store URLs (Optuna storage, MLflow tracking) parsed in one place.

Accepted forms:

* ``sqlite:///PATH`` (a local file; Optuna or MLflow);
* ``postgresql://USER:PW@HOST:PORT/DB`` (also ``postgres://`` and any
  ``postgresql+DRIVER://``): normalised to SQLAlchemy's ``postgresql+psycopg://``,
  the driver installed with the project;
* ``mysql://...`` (SQLAlchemy's own driver resolution; untested here);
* ``journal:PATH`` (Optuna's journal file, Optuna storage only);
* ``http(s)://HOST:PORT`` (an MLflow tracking server) and ``file:`` (MLflow only).

Without a URL, both stores are files in the runs folder (:data:`DEFAULT_RUNS_DIR`):
``optuna.db`` for Optuna, ``mlflow.db`` and ``artifacts/`` for MLflow.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .core.locks import WRITE_REFUSED

DEFAULT_RUNS_DIR = Path("mlruns")

Kind = Literal["sqlite", "postgresql", "mysql", "journal", "http", "file", "unknown"]


@dataclass(frozen=True)
class StoreURL:
    url: str  # normalised (the PostgreSQL driver made explicit)
    kind: Kind
    path: Path | None = None  # the local file of a sqlite or journal store

    @property
    def is_database_server(self) -> bool:
        return self.kind in ("postgresql", "mysql")

    @property
    def lock_path(self) -> Path | None:
        """A lock file beside a local store, else None."""
        return None if self.path is None else self.path.with_name(f".{self.path.name}.topocam.lock")


def sqlite_url(path: Path) -> str:
    """``sqlite:///`` URL of a database file, its folder made absolute."""
    path = Path(path)
    return f"sqlite:///{path.parent.resolve() / path.name}"


def parse_store_url(url: str) -> StoreURL:
    """Classify a store URL; never raises (an unknown scheme is ``kind="unknown"``)."""
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    base = scheme.split("+", 1)[0].lower()
    if url.startswith("sqlite:///"):
        return StoreURL(url, "sqlite", Path(url.removeprefix("sqlite:///").split("?")[0]))
    if url.startswith("journal:"):
        return StoreURL(url, "journal", Path(url.removeprefix("journal:").removeprefix("//")))
    if sep and base in ("postgresql", "postgres"):
        return StoreURL(f"postgresql+psycopg://{rest}", "postgresql")
    if sep and base == "mysql":
        return StoreURL(url, "mysql")
    if sep and base in ("http", "https"):
        return StoreURL(url, "http")
    if url.startswith("file:"):
        return StoreURL(url, "file")
    return StoreURL(url, "unknown")


def write_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is the OS refusing a write (not a full disk, not a missing folder)."""
    return isinstance(exc, OSError) and exc.errno in WRITE_REFUSED


def not_writable(path: Path) -> str | None:
    """Why this process cannot write the local store ``path``, or None if it can: its file is read-only,
    or its folder is, where the lock, SQLite's journal and a new file are made. Asked of the OS
    (``os.access``: the permission bits, the user's capabilities and a read-only mount); nothing is
    opened, so no lock this process holds on the file is dropped."""
    path = Path(path)
    if path.exists() and not os.access(path, os.W_OK):
        return f"the file {path} is read-only"
    folder = path.parent
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        return f"its folder {folder} is read-only"
    return None


def sqlite_read_only(path: Path):
    """A DB-API connection factory opening the SQLite file ``path`` read-only (``mode=ro``): no
    journal, lock file or new database is ever made, so a read-only file or folder can be read.
    (SQLAlchemy's own ``?mode=ro&uri=true`` form is not used: it unquotes the path, and a ``#``
    or ``%`` in a folder name then opens another file.)"""
    import sqlite3

    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    return lambda: sqlite3.connect(uri, uri=True, timeout=60, check_same_thread=False)


def sqlite_tables(path: Path) -> set[str] | None:
    """The table names of the SQLite file ``path``, read read-only; None if it is not a database
    (any other failure, say a file it may not read, is raised)."""
    import sqlite3

    con = sqlite_read_only(path)()
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            return None
        raise
    finally:
        con.close()


def redact_url(url: str) -> str:
    """A storage / tracking URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)
