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

from .test_scale_out import diagnosis, finish, start_slow_worker, start_worker, trials_of, warm_cache
from .test_study import write_study

S = optuna.trial.TrialState
STOP_WITHIN_S = 60  # a worker whose store is gone must have said so by then


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from warm_cache(tmp_path_factory)


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
    line = one_error_line(out, "Optuna storage", url, "run the same command again")
    print(f"stopped {took:.1f} s after the server went away: {line}")
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
    line = one_error_line(out, "MLflow tracking store", server, "run the same command again")
    print(f"stopped {took:.1f} s after the server went away ({fault}): {line}")
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
    line = one_error_line(out, "MLflow tracking store", str(db), "run the same command again")
    print(f"stopped {took:.1f} s after the file was deleted: {line}")
    trials = trials_of(url, "mlfdel.random.s0")
    assert [t.state for t in trials][:2] == [S.COMPLETE, S.COMPLETE] and sum(t.state == S.COMPLETE for t in trials) == 2, trials
    complete_after_rerun(env, tmp_path, study, url, "mlfdel.random.s0", 5)


# ------------------------------------------------ a half-created local MLflow database

# A full disk while MLflow creates its database, for real: the file size limit (RLIMIT_FSIZE)
# makes SQLite's writes fail past ``limit`` bytes, as ENOSPC would. A complete store is ~1 MB.
FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
from pathlib import Path
from topocam.tracking import Tracker
try:
    Tracker(None, Path({runs!r}))
except Exception as exc:
    sys.exit(f"failed: {{exc}}")
"""


def half_created(runs: Path, limit: int) -> Path:
    """``runs/mlflow.db`` as a full disk leaves it part-way through its creation."""
    import sys

    from .test_scale_out import REPO

    r = subprocess.run([sys.executable, "-c", FULL_DISK.format(limit=limit, runs=str(runs))], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    db = runs / "mlflow.db"
    assert r.returncode != 0 and "disk I/O error" in r.stderr, r.stderr[-2000:]  # the creation really failed
    assert db.stat().st_size > 0 and not list(runs.glob("mlflow.db.broken-*")), "nothing may be set aside while the disk is full"
    return db


@pytest.mark.parametrize("limit", [60_000, 250_000])  # a few tables and no schema version; most migrations done
def test_a_half_created_mlflow_database_holding_no_runs_is_set_aside_and_recreated(tmp_path, limit):
    """Without this every later open failed ("duplicate column name: step", "table logged_models
    already exists") even once there was space again."""
    from topocam.core.errors import DamagedStoreWarning
    from topocam.tracking import Tracker

    runs = tmp_path / "mlruns"
    runs.mkdir()
    db = half_created(runs, limit)
    with pytest.warns(DamagedStoreWarning, match=r"half-created .* held no runs: moved it to mlflow\.db\.broken-\d{8}-\d{6} and created a new one"):
        tracker = Tracker(None, runs)
    (aside,) = runs.glob("mlflow.db.broken-*")
    assert aside.stat().st_size > 0 and db.is_file()
    rid = tracker.start_run(tracker.experiment("after"), "r", {"kind": "trial"})
    tracker.log_metrics(rid, {"val_auc": 0.5})
    tracker.finish(rid)
    assert Tracker(None, runs).get_run(rid).data.metrics == {"val_auc": 0.5}  # and it opens again, quietly


def _half_upgraded_with_runs(db: Path) -> None:
    """A store holding a run whose upgrade to a newer MLflow a full disk cut short: a table the
    new version adds is missing and the schema version is an old one, so MLflow migrates again
    over columns that exist. Written by another process: MLflow keeps the stores it opened for
    the life of a process."""
    import sqlite3
    import sys

    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    from .test_scale_out import REPO

    script = (f"from topocam.tracking import Tracker; t = Tracker(None, {str(db.parent)!r}); "
              "t.finish(t.start_run(t.experiment('kept'), 'r', {}))")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120, cwd=REPO)
    base = ScriptDirectory.from_config(_get_alembic_config("")).get_base()
    con = sqlite3.connect(db)
    con.execute("DROP TABLE logged_model_tags")
    con.execute("UPDATE alembic_version SET version_num = ?", (base,))
    con.commit()
    con.close()


def kept(db: Path) -> object:
    """What must survive: the runs of a readable file (MLflow's own migration attempt may add a
    table), the bytes of an unreadable one."""
    import hashlib
    import sqlite3

    try:
        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as con:
            return sorted(con.execute("SELECT run_uuid, status FROM runs").fetchall())
    except sqlite3.Error:
        return hashlib.sha256(db.read_bytes()).hexdigest()


def _not_a_database(db: Path) -> None:
    db.write_bytes(b"SQLite format 3\x00" + b"\x07" * 3000)


@pytest.mark.parametrize("damage, words", [
    (_half_upgraded_with_runs, ["half-upgraded", "holds 1 run", "left as it is", "mlflow db upgrade", "mv "]),
    (_not_a_database, ["is damaged", "restore it from a backup", "mv "]),
])
def test_an_mlflow_database_that_may_hold_runs_is_left_alone_with_one_line(tmp_path, damage, words):
    """A file MLflow cannot open that holds runs, or that SQLite cannot read, is kept where it is
    with its runs: one ``error:`` line names it and the fix, within seconds."""
    from typer.testing import CliRunner

    from topocam.cli import app

    runs = tmp_path / "mlruns"
    runs.mkdir()
    db = runs / "mlflow.db"
    damage(db)
    before = kept(db)
    study = write_study(tmp_path, "damaged")
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, ["study", "run", str(study), "--runs-dir", str(runs), "--quiet"])
    assert time.perf_counter() - t0 < 30
    assert r.exit_code != 0, r.output
    one_error_line(r.output, str(db), *words)  # after MLflow's own INFO lines, when it tried to migrate
    assert kept(db) == before and not list(runs.glob("mlflow.db.broken-*"))


@pytest.mark.slow
def test_the_next_study_run_after_a_full_disk_recovers_saying_so_in_one_line(env, tmp_path):
    """The CLI, on a runs folder whose mlflow.db a full disk left half-created: one ``warning:``
    line naming the file set aside, then the study runs."""
    runs = tmp_path / "mlruns"
    runs.mkdir()
    half_created(runs, 60_000)
    study = write_study(tmp_path, "afterfull")
    (out,) = finish(procs := [start_worker(env, tmp_path, study, "--n-trials", "1")])
    assert procs[0].returncode == 0, out[-3000:]
    notes = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert len(notes) == 1 and "moved it to mlflow.db.broken-" in notes[0] and "Traceback" not in out, out[-3000:]
