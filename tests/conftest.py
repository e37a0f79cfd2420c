"""Shared fixtures: tiny synthetic data and a small trained backbone (CPU-sized)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOPOCAM_OFFLINE", "1")  # never wait on the network in tests

SHARED_MEDMNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist"


def medmnist_file(name: str) -> Path:
    """Path of an official MedMNIST file in ../shared, or skip with a message."""
    path = SHARED_MEDMNIST / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: real-data test skipped (see ../shared/data/medmnist/README.md)")
    return path


_STORE_ENV = ("MLFLOW_TRACKING_URI", "TOPOCAM_STORAGE")


@pytest.fixture(autouse=True)
def _no_store_from_the_environment():
    """The CLI honours MLFLOW_TRACKING_URI / TOPOCAM_STORAGE, and mlflow.set_tracking_uri sets the
    former for the whole process: without this, one test's store leaks into the next test's
    runs (and into the workers it starts)."""
    saved = {k: os.environ.pop(k, None) for k in _STORE_ENV}
    yield
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("topocam-cache")


@pytest.fixture(scope="session")
def synth2d():
    from topocam.data import make_synthetic

    return make_synthetic(2, size=20, n=(80, 30, 30), seed=1)


@pytest.fixture(scope="session")
def base_config(cache_dir):
    from topocam.pipeline import TopoCAMConfig

    return TopoCAMConfig(
        dataset="synthetic2d", size=20, synthetic_n=(80, 30, 30), backbone="small", epochs=10, batch_size=16,
        seed=1, bins=12, mlp=(32, 16), betti_backend="fast", n_jobs=1, cache_dir=str(cache_dir),
    )


@pytest.fixture(scope="session")
def ctx2d(base_config, synth2d):
    """A context with a small backbone trained on synthetic 2D data."""
    from topocam.pipeline import prepare

    return prepare(base_config, progress=False, data=synth2d)


@pytest.fixture(scope="session")
def shipped(tmp_path_factory):
    """A tiny study searched by two samplers and exported as the registered model
    ``tiny-topocam`` (alias champion), in a real SQLite MLflow store; shared by the
    shipping tests (tests/shipping.py)."""
    from .shipping import make_shipped

    root = tmp_path_factory.mktemp("shipped")
    mp = pytest.MonkeyPatch()
    mp.setenv("TOPOCAM_CACHE_DIR", str(root / "cache"))
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        yield make_shipped(root)
    finally:
        mp.undo()


# ------------------------------------------------------------- a private PostgreSQL server


def _postgres_bin() -> Path | None:
    """The newest server binaries folder (Debian: /usr/lib/postgresql/<major>/bin), or PATH's."""
    import shutil

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster on loopback (trust auth, a free port, its socket in its
    own folder), started once per session; ``postgres.database(name)`` creates a database and
    returns its ``postgresql://`` URL. Skipped, saying why, when the server binaries are absent.
    As root the server runs as the ``postgres`` user (PostgreSQL refuses to run as root)."""
    import pwd
    import shutil
    import subprocess
    import tempfile

    from .shipping import free_port
    from types import SimpleNamespace

    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries absent (apt-get install postgresql): PostgreSQL tests skipped")
    run_as: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run the server as: PostgreSQL tests skipped")
        run_as = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="topocam-pg-"))  # in /tmp: the postgres user can reach it
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if owner is not None:
        for p in (root, sock):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    port = free_port()

    def pg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*run_as, *args], capture_output=True, text=True, timeout=120, cwd=root)

    r = pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed: {r.stderr[-2000:]}")
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
    r = pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "server.log"), "-w", "-t", "60", "start")
    if r.returncode != 0:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed: {r.stderr[-1500:]}\n{log[-1500:]}")
    base = f"postgresql://postgres@127.0.0.1:{port}"

    def database(name: str) -> str:
        import psycopg

        with psycopg.connect(f"{base}/postgres", autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}"')
            con.execute(f'CREATE DATABASE "{name}"')
        return f"{base}/{name}"

    try:
        yield SimpleNamespace(port=port, url=f"{base}/postgres", database=database)
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """An MLflow tracking server on loopback with its backend store in the private PostgreSQL
    server (what several machines share); yields its http:// URL."""
    import subprocess
    import sys
    import time
    import urllib.request

    from .shipping import free_port, stop_group

    port = free_port()
    store = postgres.database("mlflow").replace("postgresql://", "postgresql+psycopg://", 1)
    root = tmp_path_factory.mktemp("mlflow-server")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--artifacts-destination",
         str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        stop_group(proc, timeout=20)
        log.close()
