"""Stores that fail mid-study, for real (issue 13): a PostgreSQL server stopped, an MLflow
tracking server killed, the local MLflow database deleted or left half-created. Each ends in
one ``error:`` line within seconds, naming what failed and what to do, with the interrupted
trial not counted; once the store is back, the same command completes the budget.

Workers are CLI processes (tests/test_scale_out.py's ``start_slow_worker``: trials that sleep,
so that the fault lands mid-study) on the tiny synthetic study of tests/test_study.py.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import optuna
import pytest

from .test_scale_out import diagnosis, env, finish, start_slow_worker, start_worker, trials_of  # noqa: F401 - env: fixture
from .test_study import write_study

S = optuna.trial.TrialState
STOP_WITHIN_S = 60  # a worker whose store is gone must have said so by then


def stopped(proc: subprocess.Popen, since: float) -> tuple[str, float]:
    """The output of a worker that must stop by itself, and how long after ``since`` it did."""
    try:
        out = proc.communicate(timeout=STOP_WITHIN_S)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the worker still ran {STOP_WITHIN_S} s after its store went away:\n{proc.communicate()[0][-3000:]}")
    return out, time.monotonic() - since


def one_error_line(out: str, *words: str) -> str:
    """The worker's one ``error:`` line (its last), with these words; no traceback anywhere."""
    lines = [ln for ln in out.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert "Traceback" not in out and len(errors) == 1 and lines[-1] == errors[0], out[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def complete_after_rerun(env, folder: Path, study: Path, url: str, name: str, n: int, *args: str) -> list:
    """Run the same command again: it finishes with exactly ``n`` trials that count, all COMPLETE."""
    procs = [start_worker(env, folder, study, "--sampler", "random", "--seed", "0", "--n-trials", str(n), "--storage", url, *args)]
    outs = finish(procs, timeout=240)
    trials = trials_of(url, name)
    diag = diagnosis(trials, procs, outs)
    assert procs[0].returncode == 0, diag
    assert sum(t.state == S.COMPLETE for t in trials) == n, diag
    assert all(t.state == S.COMPLETE or (t.state == S.FAIL and "error" not in t.user_attrs) for t in trials), diag
    return trials


@pytest.mark.slow
def test_postgresql_going_away_mid_study_stops_the_worker_and_a_rerun_completes(env, own_postgres, tmp_path):
    """``pg_ctl stop -m immediate`` after the first COMPLETE trial: the worker exits non-zero
    within seconds with one line naming the storage; restarted, the same command finishes
    exactly the budget, the interrupted trial re-run. (It used to end in ~1400 lines: the
    heartbeat thread's traceback, then Typer's of the ``UnboundLocalError`` Optuna raises
    while handling the driver's error, which the runner did not recognise as the storage's.)"""
    url = own_postgres.database("gone")
    study = write_study(tmp_path, "pggone", study={"grace_period": 4})
    args = ("--sampler", "random", "--seed", "0", "--n-trials", "3", "--storage", url)
    proc, _ = start_slow_worker(env, tmp_path, study, *args, sleep_s=2.0, started=2)
    t0 = time.monotonic()
    own_postgres.stop("immediate")
    out, took = stopped(proc, t0)
    assert proc.returncode not in (0, None), out[-3000:]
    one_error_line(out, "Optuna storage", url, "run the same command again")
    print(f"stopped {took:.1f} s after the server went away")
    own_postgres.start()
    trials = complete_after_rerun(env, tmp_path, study, url, "pggone.random.s0", 3)
    lost = [t for t in trials if t.state == S.FAIL]
    assert len(lost) == 1 and lost[0].number == 1, trials  # the interrupted trial, re-run under another number
    assert any(t.params == lost[0].params for t in trials if t.state == S.COMPLETE), trials


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_mlflow_server_going_away_mid_study_stops_the_worker_and_a_rerun_completes(env, own_mlflow_server, tmp_path, fault):
    """The tracking server's process group killed (or frozen: it accepts connections and never
    answers) after the first COMPLETE trial: one line naming the tracking store within seconds
    (Tracker bounds MLflow's HTTP client: no retry, 10 s per request, instead of retries for
    minutes); restarted on the same port, the same command finishes exactly the budget. (The
    line came after ~100 lines of the HTTP stack's traceback, logged by Optuna.)"""
    server = own_mlflow_server.start()
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = write_study(tmp_path, "mlfgone", study={"grace_period": 4})
    args = ("--sampler", "random", "--seed", "0", "--n-trials", "3", "--storage", url, "--tracking-uri", server)
    proc, _ = start_slow_worker(env, tmp_path, study, *args, sleep_s=2.0, started=2)
    t0 = time.monotonic()
    getattr(own_mlflow_server, fault)()
    out, took = stopped(proc, t0)
    assert proc.returncode not in (0, None), out[-3000:]
    one_error_line(out, "MLflow tracking store", server, "run the same command again")
    print(f"stopped {took:.1f} s after the server went away ({fault})")
    if fault == "kill":
        own_mlflow_server.start()
    else:
        own_mlflow_server.thaw()
    trials = complete_after_rerun(env, tmp_path, study, url, "mlfgone.random.s0", 3, "--tracking-uri", server)
    assert [t.number for t in trials if t.state == S.FAIL] == [1], trials


@pytest.mark.slow
def test_local_mlflow_database_deleted_mid_study_stops_the_worker_and_spares_the_budget(env, tmp_path):
    """``mlruns/mlflow.db`` deleted for real while trial 2 runs: the worker stops with one line
    naming the file (it must not go on logging into a file no one can open again); trials 0
    and 1 stay COMPLETE, the interrupted one does not count; the same command then completes
    the budget in a new tracking database. (SQLite notices the unlinked file on the next write,
    "attempt to write a readonly database"; that came after ~460 lines of MLflow's log of the
    error and Optuna's traceback, and did not say the file was gone.)"""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    db = tmp_path / "mlruns" / "mlflow.db"
    study = write_study(tmp_path, "mlfdel", study={"grace_period": 4})
    args = ("--sampler", "random", "--seed", "0", "--n-trials", "5", "--storage", url)
    proc, _ = start_slow_worker(env, tmp_path, study, *args, sleep_s=2.0, started=3)
    t0 = time.monotonic()
    db.unlink()
    out, took = stopped(proc, t0)
    assert proc.returncode not in (0, None), out[-3000:]
    one_error_line(out, "MLflow tracking store", str(db), "run the same command again")
    print(f"stopped {took:.1f} s after the file was deleted")
    trials = trials_of(url, "mlfdel.random.s0")
    assert [t.state for t in trials][:2] == [S.COMPLETE, S.COMPLETE] and sum(t.state == S.COMPLETE for t in trials) == 2, trials
    complete_after_rerun(env, tmp_path, study, url, "mlfdel.random.s0", 5)
