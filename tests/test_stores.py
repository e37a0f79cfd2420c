"""Local stores opened by several processes at once (real SQLite, real Optuna and MLflow)."""

from __future__ import annotations

import multiprocessing as mp

import pytest


def _open_both(folder: str, barrier, queue) -> None:
    try:
        import optuna

        from topocam.search.storage import open_storage
        from topocam.tracking import Tracker

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        barrier.wait()  # all processes hit the fresh files at the same moment
        storage = open_storage(f"sqlite:///{folder}/optuna.db")
        optuna.create_study(study_name="race", storage=storage, load_if_exists=True)
        Tracker(f"sqlite:///{folder}/mlflow.db").experiment("race")
        queue.put("ok")
    except BaseException as exc:  # reported to the test, which shows it
        queue.put(f"{type(exc).__name__}: {exc}"[:400])


@pytest.mark.slow
def test_three_processes_create_fresh_stores_together(tmp_path):
    """Without the store lock this failed on most tries (MLflow: 'duplicate column name: step',
    'UNIQUE constraint failed: alembic_version.version_num'; Optuna: 'table trials already exists')."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_open_both, args=(str(tmp_path), barrier, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    results = [queue.get(timeout=5) for _ in procs]
    assert results == ["ok"] * 3, results


HOLDER = """
import sys, time
from pathlib import Path
from topocam.core.atomic import atomic_path
from topocam.core.locks import load_or_build
entry, building, hold_s = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

def build():
    building.write_text("")
    time.sleep(hold_s)  # a backbone training
    with atomic_path(entry) as tmp:
        tmp.write_text("built by the holder")
    return "built by the holder"

load_or_build(entry, lambda: entry.read_text() if entry.exists() else None, build)
"""


def test_a_process_waiting_for_another_s_cache_entry_says_so_once(tmp_path, monkeypatch, capfd):
    """Another process builds the entry for longer than WAIT_NOTICE_S: this one says, once, on
    stderr, whom it waits for and for what, then loads what was built (it builds nothing)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from topocam.core import locks as stores

    repo = Path(__file__).resolve().parents[1]
    entry, building = tmp_path / "backbone.pt", tmp_path / "building"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(entry), str(building), "3"], cwd=repo)
    try:
        deadline = time.monotonic() + 60
        while not building.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder never started building"
            time.sleep(0.05)
        monkeypatch.setattr(stores, "WAIT_NOTICE_S", 0.5)
        capfd.readouterr()

        def build():
            raise AssertionError("built twice")

        value, loaded = stores.load_or_build(entry, lambda: entry.read_text() if entry.exists() else None, build)
        assert (value, loaded) == ("built by the holder", True)
        lines = capfd.readouterr().err.splitlines()
        assert lines == [f"waiting for another process (pid {holder.pid}) to build {entry} ..."], lines
    finally:
        holder.wait(timeout=60)
    entry.unlink()  # free lock, nothing to wait for: nothing said
    stores.load_or_build(entry, lambda: entry.read_text() if entry.exists() else None, lambda: "built here")
    assert capfd.readouterr().err == ""
