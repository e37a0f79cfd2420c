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
    from topocam.core.data import make_synthetic

    return make_synthetic(2, size=20, n=(80, 30, 30), seed=1)


@pytest.fixture(scope="session")
def base_config(cache_dir):
    from topocam.core.pipeline import TopoCAMConfig

    return TopoCAMConfig(
        dataset="synthetic2d", size=20, synthetic_n=(80, 30, 30), backbone="small", epochs=10, batch_size=16,
        seed=1, bins=12, mlp=(32, 16), betti_backend="fast", n_jobs=1, cache_dir=str(cache_dir),
    )


@pytest.fixture(scope="session")
def ctx2d(base_config, synth2d):
    """A context with a small backbone trained on synthetic 2D data."""
    from topocam.core.pipeline import prepare

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


class PgCluster:
    """A throwaway PostgreSQL cluster on loopback (trust auth, a free port, its socket in its own
    folder, in /tmp: the postgres user can reach it). ``database(name)`` creates a database and
    returns its ``postgresql://`` URL; ``stop()`` and ``start()`` take the server away and bring it
    back on the same port with the same data. As root the server runs as the ``postgres`` user
    (PostgreSQL refuses to run as root)."""

    def __init__(self):
        import pwd
        import shutil
        import tempfile

        from .shipping import free_port

        self.bindir = _postgres_bin()
        if self.bindir is None:
            pytest.skip("PostgreSQL server binaries absent (apt-get install postgresql): PostgreSQL tests skipped")
        self.run_as: list[str] = []
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and no 'postgres' user to run the server as: PostgreSQL tests skipped")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self.root = Path(tempfile.mkdtemp(prefix="topocam-pg-"))
        self.data, sock = self.root / "data", self.root / "sock"
        sock.mkdir()
        if owner is not None:
            for p in (self.root, sock):
                os.chown(p, owner.pw_uid, owner.pw_gid)
        self.port = free_port()
        r = self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        if r.returncode != 0:
            shutil.rmtree(self.root, ignore_errors=True)
            pytest.fail(f"initdb failed: {r.stderr[-2000:]}")
        self.opts = f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        self.base = f"postgresql://postgres@127.0.0.1:{self.port}"
        self.url = f"{self.base}/postgres"
        self.start()

    def _pg(self, tool: str, *args: str):
        import subprocess

        return subprocess.run([*self.run_as, str(self.bindir / tool), *args], capture_output=True, text=True, timeout=120,
                              cwd=self.root)

    def start(self) -> None:
        log = self.root / "server.log"
        r = self._pg("pg_ctl", "-D", str(self.data), "-o", self.opts, "-l", str(log), "-w", "-t", "60", "start")
        if r.returncode != 0:
            pytest.fail(f"pg_ctl start failed: {r.stderr[-1500:]}\n{log.read_text()[-1500:] if log.exists() else ''}")

    def stop(self, mode: str = "immediate") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}"')
            con.execute(f'CREATE DATABASE "{name}"')
        return f"{self.base}/{name}"

    def remove(self) -> None:
        import shutil

        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL cluster (:class:`PgCluster`) shared by the session; skipped, saying
    why, when the server binaries are absent. Never stopped by a test: see ``own_postgres``."""
    cluster = PgCluster()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def own_postgres():
    """A cluster of the test's own, which it may stop and start (a database that goes away)."""
    cluster = PgCluster()
    try:
        yield cluster
    finally:
        cluster.remove()


class MlflowServer:
    """``mlflow server`` on loopback (its own process group), backend ``store``, artifacts under
    ``root``; ``start()`` waits for /health, ``kill()`` takes the whole group away at once, and a
    later ``start()`` brings it back on the same port with the same store."""

    def __init__(self, store: str, root: Path):
        from .shipping import free_port

        self.store, self.root, self.port = store, root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 120) -> str:
        import subprocess
        import sys
        import time
        import urllib.request

        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store, "--artifacts-destination",
                 str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self.url
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    pytest.fail(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)

    def kill(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            os.killpg(self.proc.pid, signal.SIGCONT)  # a frozen group dies only once continued
            self.proc.wait()

    def freeze(self) -> None:
        """The server stops answering (SIGSTOP): connections are accepted, no reply ever comes."""
        import signal

        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        import signal

        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        from .shipping import stop_group

        if self.proc is not None:
            stop_group(self.proc, timeout=20)


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """An MLflow tracking server on loopback with its backend store in the private PostgreSQL
    server (what several machines share); yields its http:// URL."""
    store = postgres.database("mlflow").replace("postgresql://", "postgresql+psycopg://", 1)
    server = MlflowServer(store, tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def own_mlflow_server(tmp_path):
    """An MLflow tracking server of the test's own (SQLite backend), which it may kill and restart."""
    root = tmp_path / "mlflow-server"
    root.mkdir()
    server = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root)
    try:
        yield server
    finally:
        server.stop()
