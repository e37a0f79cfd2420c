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
