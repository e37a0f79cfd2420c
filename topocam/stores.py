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

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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


def redact_url(url: str) -> str:
    """A storage / tracking URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)
