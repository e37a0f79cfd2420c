"""Many workers on one study: a private PostgreSQL server (conftest ``postgres``), Optuna's
journal file, worker processes started through the CLI, killed and interrupted ones.

Workers are real processes (``python cli.py study run ...``) on the tiny synthetic study of
tests/test_study.py, sharing one backbone/CAM cache built once by the ``warm`` fixture.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from topocam.core.errors import TopoCAMError
from topocam.search.storage import open_storage
from topocam.stores import parse_store_url

from .test_study import write_study

REPO = Path(__file__).resolve().parents[1]
S = optuna.trial.TrialState


def warm_cache(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """One backbone/CAM cache for every worker of a module, built once; the module's ``env``
    fixture (``yield from``), which also points this process at it."""
    from topocam.core.pipeline import prepare
    from topocam.search.studyfile import load_study

    cache = tmp_path_factory.mktemp("scale-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("TOPOCAM_CACHE_DIR", str(cache))
    mp.setenv("TOPOCAM_OFFLINE", "1")
    try:
        ctx = prepare(load_study(write_study(tmp_path_factory.mktemp("warm"), "warm")).base, progress=False)
        for v in ("gradcam", "gradcampp"):
            ctx.cams(v, "train")
        yield SimpleNamespace(cache=cache)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from warm_cache(tmp_path_factory)


def worker_env(env, **extra: str) -> dict[str, str]:
    return {**os.environ, "TOPOCAM_CACHE_DIR": str(env.cache), "TOPOCAM_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def start_worker(env, folder: Path, study: Path, *args: str, **extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "cli.py"), "study", "run", str(study), "--runs-dir", str(folder / "mlruns"), "--quiet", *args]
    return subprocess.Popen(cmd, cwd=folder, env=worker_env(env, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outs = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a worker did not finish in time")
    return outs


def trials_of(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    st = optuna.load_study(study_name=name, storage=open_storage(url))
    return sorted(st.get_trials(deepcopy=False), key=lambda t: t.number)


def diagnosis(trials, procs, outs) -> str:
    rows = [(t.number, t.state.name, t.user_attrs.get("error"), t.system_attrs.get("de")) for t in trials]
    return f"trials: {rows}\n" + "\n".join(f"--- worker {i} (rc {p.returncode}):\n{o[-2000:]}" for i, (p, o) in enumerate(zip(procs, outs)))


# ------------------------------------------------------------------ URLs


@pytest.mark.parametrize("url, kind, path", [
    ("sqlite:////a/b.db", "sqlite", "/a/b.db"),
    ("sqlite:////a/b.db?timeout=3", "sqlite", "/a/b.db"),
    ("journal:/a/j.log", "journal", "/a/j.log"),
    ("postgresql://u@h/db", "postgresql", None),
    ("postgres://u@h/db", "postgresql", None),
    ("postgresql+psycopg2://u@h/db", "postgresql", None),
    ("http://127.0.0.1:5000", "http", None),
    ("redis://x", "unknown", None),
])
def test_store_urls_parse_in_one_place(url, kind, path):
    store = parse_store_url(url)
    assert store.kind == kind and (str(store.path) if store.path else None) == path
    if kind == "postgresql":
        assert store.url.startswith("postgresql+psycopg://") and store.url.endswith("u@h/db")
    if path:
        assert store.lock_path == Path(path).with_name(f".{Path(path).name}.topocam.lock")


# ------------------------------------------------------------ PostgreSQL


@pytest.mark.slow
def test_three_workers_on_postgresql_finish_exactly_the_budget(env, postgres, mlflow_server, tmp_path):
    """Three processes join one DE study on PostgreSQL, logging to one MLflow server: exactly
    n_trials trials, all complete, each DE (generation, slot) built once from its own trial
    number, no duplicate individual; one MLflow run per trial, nested under one sampler run."""
    url = postgres.database("three")
    study = write_study(tmp_path, "pgworkers")
    n = 8  # two generations of the population of 4
    procs = [start_worker(env, tmp_path, study, "--sampler", "de", "--seed", "0", "--n-trials", str(n), "--storage", url,
                          "--tracking-uri", mlflow_server) for _ in range(3)]
    outs = finish(procs)
    trials = trials_of(url, "pgworkers.de.s0")
    diag = diagnosis(trials, procs, outs)
    assert all(p.returncode == 0 for p in procs), diag
    assert [t.number for t in trials] == list(range(n)), diag
    assert all(t.state == S.COMPLETE for t in trials), diag
    assert len({tuple(sorted(t.params.items())) for t in trials}) == n, f"duplicate individual\n{diag}"
    records = [t.system_attrs.get("de") for t in trials]
    assert all(r is not None for r in records), diag
    for t, rec in zip(trials, records):  # every trial holds the slot its own number names
        assert (rec["generation"], rec["slot"]) == divmod(t.number, 4), diag
    xs = [tuple(r["x"]) for r in records if r["x"] is not None]  # None: sampled before the DE space was known
    assert len(xs) >= n - 3 and len(set(xs)) == len(xs), diag
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("pgworkers").experiment_id], max_results=100)
    by_kind = {k: [r for r in runs if r.data.tags.get("kind") == k] for k in ("sampler", "baseline", "best", "trial")}
    assert {k: len(v) for k, v in by_kind.items()} == {"sampler": 1, "baseline": 2, "best": 1, "trial": n}, diag
    parent = by_kind["sampler"][0].info.run_id
    assert sorted(int(r.data.tags["trial"]) for r in by_kind["trial"]) == list(range(n)), diag
    assert all(r.data.tags["mlflow.parentRunId"] == parent and r.info.status == "FINISHED" for r in by_kind["trial"]), diag


# ---------------------------------------------------------------- journal file


@pytest.mark.slow
def test_two_workers_on_a_journal_file_finish_exactly_the_budget(env, tmp_path):
    """One machine, no server: Optuna's journal file (``--storage journal:PATH``)."""
    url = f"journal:{tmp_path / 'optuna.journal'}"
    study = write_study(tmp_path, "jworkers")
    n = 6
    procs = [start_worker(env, tmp_path, study, "--sampler", "tpe", "--seed", "0", "--n-trials", str(n), "--storage", url)
             for _ in range(2)]
    outs = finish(procs)
    trials = trials_of(url, "jworkers.tpe.s0")
    diag = diagnosis(trials, procs, outs)
    assert all(p.returncode == 0 for p in procs), diag
    assert [t.number for t in trials] == list(range(n)) and all(t.state == S.COMPLETE for t in trials), diag
    assert (tmp_path / "optuna.journal").stat().st_size > 0


# ---------------------------------------------------------------- crash safety

# A worker whose trials take TRIAL_SLEEP seconds, so a test can stop it mid-trial: the real CLI
# with the pipeline's evaluate wrapped (a test-only hook; the product has none).
SLOW_WORKER = """
import os, sys, time
sys.path.insert(0, {repo!r})
import topocam.search.runner as runner
real = runner.evaluate
def slow(ctx, cfg, report_test=False, **kw):
    if not report_test:
        with open(os.environ["TRIAL_LOG"], "a") as f:
            f.write("start\\n")
        time.sleep(float(os.environ["TRIAL_SLEEP"]))
    return real(ctx, cfg, report_test, **kw)
runner.evaluate = slow
from topocam.cli import main
main()
"""


SLOW_TRIAL_S = 300  # far longer than any stop: a worker that ignored the signal would still be sleeping


def start_slow_worker(env, folder: Path, study: Path, *args: str, sleep_s: float = SLOW_TRIAL_S,
                      started: int = 1) -> tuple[subprocess.Popen, Path]:
    """A worker whose trials each sleep ``sleep_s``; returns once its ``started``-th trial is under way."""
    script, log = folder / "slow_worker.py", folder / "trials.log"
    script.write_text(SLOW_WORKER.format(repo=str(REPO)))
    cmd = [sys.executable, str(script), "study", "run", str(study), "--runs-dir", str(folder / "mlruns"), "--quiet", *args]
    # started as a script starts a background worker (`worker &`, nohup): SIGINT ignored on entry,
    # which Python keeps unless the CLI installs its handler (without it, `kill -INT` did nothing)
    proc = subprocess.Popen(cmd, cwd=folder, env=worker_env(env, TRIAL_LOG=str(log), TRIAL_SLEEP=str(sleep_s)),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not (log.is_file() and log.read_text().count("start") >= started):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the slow worker never started a trial:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.2)
    time.sleep(1.0)  # inside the trial: its MLflow run exists, heartbeats are being sent
    return proc, log


def trial_runs(folder: Path, study: str) -> dict[int, object]:
    from topocam.tracking import Tracker

    tracker = Tracker(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    runs = tracker.search_runs([tracker.experiment(study)], filter_string="tags.kind = 'trial'", max_results=100)
    return {int(r.data.tags["trial"]): r for r in runs}


@pytest.mark.slow
def test_sigkilled_worker_trial_is_failed_rerun_and_closed(env, tmp_path):
    """kill -9 mid-trial: after the grace period the next worker fails the trial, re-runs its
    configuration, closes its MLflow run as KILLED; the budget is 3 COMPLETE trials."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = write_study(tmp_path, "sigkill", study={"grace_period": 4})
    victim, _ = start_slow_worker(env, tmp_path, study, "--sampler", "random", "--seed", "0", "--n-trials", "3", "--storage", url)
    victim.send_signal(9)
    victim.wait(timeout=30)
    (lost,) = trials_of(url, "sigkill.random.s0")
    assert lost.state == S.RUNNING and trial_runs(tmp_path, "sigkill")[0].info.status == "RUNNING"
    t0 = time.monotonic()
    (survivor,) = procs = [start_worker(env, tmp_path, study, "--sampler", "random", "--seed", "0", "--n-trials", "3", "--storage", url)]
    outs = finish(procs)
    trials = trials_of(url, "sigkill.random.s0")
    diag = diagnosis(trials, procs, outs) + f"\nrecovery took {time.monotonic() - t0:.1f} s"
    assert survivor.returncode == 0, diag
    assert [t.state for t in trials] == [S.FAIL, S.COMPLETE, S.COMPLETE, S.COMPLETE], diag
    assert "error" not in trials[0].user_attrs, diag  # lost, not broken: it does not count
    (rerun,) = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert rerun.params == lost.params and rerun.state == S.COMPLETE, diag
    runs = trial_runs(tmp_path, "sigkill")
    assert sorted(runs) == [0, 1, 2, 3], diag
    assert runs[0].info.status == "KILLED" and "heartbeat" in runs[0].data.tags["error"], diag
    assert all(runs[n].info.status == "FINISHED" for n in (1, 2, 3)), diag
    assert "3 trials (0 failed)" in outs[0], diag


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_sigint_stops_a_worker_cleanly(env, tmp_path, signame):
    """Ctrl-C (or SIGTERM) mid-trial: exit code 130 (143) within seconds and our one line, the
    trial FAIL with the reason and re-queued, its MLflow run and the sampler run KILLED; a rerun
    completes the budget."""
    import signal

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = write_study(tmp_path, "sigint", study={"grace_period": 4})
    proc, _ = start_slow_worker(env, tmp_path, study, "--sampler", "random", "--seed", "0", "--n-trials", "2", "--storage", url)
    t0 = time.monotonic()
    proc.send_signal(getattr(signal, signame))
    # a hang guard, not a timing target: a worker that ignored the signal sleeps SLOW_TRIAL_S; on a
    # loaded CI machine a clean stop (closing the MLflow runs, re-queueing the trial) once took > 60 s
    out = proc.communicate(timeout=SLOW_TRIAL_S * 2 // 3)[0]
    stopped_in = time.monotonic() - t0
    code, line, reason = (130, "interrupted", "interrupted") if signame == "SIGINT" else (143, "terminated (SIGTERM)", "terminated")
    assert proc.returncode == code, out[-3000:]
    assert stopped_in < SLOW_TRIAL_S / 2, stopped_in
    assert "Traceback" not in out and out.splitlines()[-1] == line, out[-3000:]
    trials = trials_of(url, "sigint.random.s0")
    assert [t.state for t in trials] == [S.FAIL, S.WAITING], trials
    assert reason in trials[0].user_attrs["stopped"] and "error" not in trials[0].user_attrs
    assert trials[1].params == trials[0].params
    (run,) = trial_runs(tmp_path, "sigint").values()
    assert run.info.status == "KILLED" and reason in run.data.tags["error"]
    from topocam.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (parent,) = tracker.search_runs([tracker.experiment("sigint")], filter_string="tags.kind = 'sampler'")
    assert parent.info.status == "KILLED"
    outs = finish(procs := [start_worker(env, tmp_path, study, "--sampler", "random", "--seed", "0", "--n-trials", "2", "--storage", url)])
    trials = trials_of(url, "sigint.random.s0")
    assert procs[0].returncode == 0, diagnosis(trials, procs, outs)
    assert [t.state for t in trials] == [S.FAIL, S.COMPLETE, S.COMPLETE], diagnosis(trials, procs, outs)


def test_de_credits_a_rerun_to_the_lost_trials_slot():
    """A DE trial lost with its worker and re-run (Optuna's retry callback, under a new trial
    number) is the evaluation of the lost trial's (generation, slot): no lost evaluation, and
    the number it occupies adds no individual."""
    from topocam.search.de import DifferentialEvolutionSampler
    from topocam.search.storage import retry_callback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = DifferentialEvolutionSampler(popsize=4, seed=3)
    study = optuna.create_study(sampler=sampler)

    def f(trial: optuna.Trial) -> float:
        return (trial.suggest_float("x", -1, 1) - 0.3) ** 2 + trial.suggest_float("y", -1, 1) ** 2

    study.optimize(f, n_trials=5)  # generation 0, and trial 4 = generation 1 slot 0
    lost = study.ask()  # trial 5: generation 1, slot 1; its worker dies mid-trial
    f(lost)
    study.tell(lost, state=S.FAIL)
    retry_callback()(study, study.trials[5])  # what the heartbeat check does
    study.optimize(f, n_trials=1)  # the re-run: trial 6
    rerun = study.trials[6]
    assert rerun.system_attrs["failed_trial"] == 5 and rerun.params == study.trials[5].params
    assert rerun.system_attrs["de"]["generation"] == 1 and rerun.system_attrs["de"]["slot"] == 1
    cache = sampler._cache(study)
    pop, scores = sampler._population(study, cache, 1)
    gen0 = [study.trials[n].value for n in range(4)]
    assert scores[1] == min(gen0[1], rerun.value)  # slot 1 of generation 1 is the re-run
    assert scores[2] == gen0[2]  # trial 6's own number (generation 1, slot 2) evaluated nothing


def test_de_rerun_of_a_trial_lost_before_it_was_recorded_takes_its_slot():
    """Trial 0 is lost before any trial completed (DE had recorded nothing for it): its re-run
    (trial 1) is generation 0, slot 0, and trial 2 goes on with slot 2."""
    from topocam.search.de import DifferentialEvolutionSampler
    from topocam.search.storage import retry_callback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=DifferentialEvolutionSampler(popsize=4, seed=3))
    lost = study.ask()
    lost.suggest_float("x", -1, 1)
    study.tell(lost, state=S.FAIL)
    retry_callback()(study, study.trials[0])
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=2)
    records = [t.system_attrs["de"] for t in study.trials[1:]]
    assert [(r["generation"], r["slot"]) for r in records] == [(0, 0), (0, 2)]


def test_grace_period_is_set_in_the_study_file(tmp_path):
    from topocam.search.studyfile import load_study

    assert load_study(write_study(tmp_path, "g0")).grace_period == 20
    assert load_study(write_study(tmp_path, "g1", study={"grace_period": 10})).grace_period == 10
    with pytest.raises(TopoCAMError, match="grace_period"):
        load_study(write_study(tmp_path, "g2", study={"grace_period": 2}))
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}", grace_period=8)
    assert storage.get_heartbeat_interval() == 2 and storage.grace_period == 8
    assert storage.get_heartbeat_stale_trial_callback() is not None


# ------------------------------------------------ infrastructure is not a trial error


def _broken_tracking(runner, monkeypatch):
    from mlflow.exceptions import MlflowException

    def create_run(*a, **k):
        raise MlflowException("(sqlite3.OperationalError) no such table: runs")

    monkeypatch.setattr(runner.tracker._client, "create_run", create_run)  # the tracker's store fails


def _full_disk(runner, monkeypatch):
    import errno

    from topocam.search import runner as runner_mod

    def evaluate(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner_mod, "evaluate", evaluate)


@pytest.mark.parametrize("fault, words", [(_broken_tracking, "MLflow tracking store"), (_full_disk, "the disk")])
def test_a_failing_store_stops_the_study_and_spares_the_budget(env, tmp_path, monkeypatch, fault, words):
    """The study stops at once with one clear message; the trial it was running does not count
    and is re-queued; once the store is back the same command completes the budget."""
    from topocam.core.errors import InfrastructureError
    from topocam.search.runner import StudyRunner
    from topocam.search.trials import counts
    from topocam.search.studyfile import load_study
    from topocam.tracking import Tracker

    monkeypatch.setenv("TOPOCAM_CACHE_DIR", str(env.cache))
    runs = tmp_path / "mlruns"
    runs.mkdir()
    url, path = f"sqlite:///{tmp_path / 'optuna.db'}", write_study(tmp_path, "infra")

    def runner() -> StudyRunner:
        return StudyRunner(load_study(path), url, Tracker(None, runs), progress=False, runs_dir=runs, log=lambda m: None)

    runner().run("random", 0, 2)
    broken = runner()
    with monkeypatch.context() as mp:
        fault(broken, mp)
        t0 = time.perf_counter()
        with pytest.raises(InfrastructureError, match=words) as exc:
            broken.run("random", 0, 5)
        assert time.perf_counter() - t0 < 30 and "run the same command again" in str(exc.value)
    trials = trials_of(url, "infra.random.s0")
    assert [t.state for t in trials] == [S.COMPLETE, S.COMPLETE, S.FAIL, S.WAITING], trials
    assert sum(counts(t) for t in trials) == 2 and trials[3].params == trials[2].params
    result = runner().run("random", 0, 5)
    trials = trials_of(url, "infra.random.s0")
    assert sum(counts(t) for t in trials) == 5 and result.n_failed == 0 and len(result.values) == 5
    assert trials[3].state == S.COMPLETE  # the interrupted configuration, re-run


@pytest.mark.parametrize("storage, words", [
    ("postgresql://postgres@127.0.0.1:1/nodb", ["cannot open Optuna storage", "127.0.0.1:1"]),
    ("postgresq://postgres@127.0.0.1/db", ["unsupported storage URL", "postgresq://"]),
    ("sqlite://relative.db", ["unsupported storage URL"]),
    ("journal:/nonexistent/dir/j.log", ["/nonexistent/dir", "does not exist"]),
])
def test_cli_bad_or_unreachable_storage_is_one_line_within_seconds(tmp_path, storage, words):
    from typer.testing import CliRunner

    from topocam.cli import app

    path = write_study(tmp_path, "clistore")
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, ["study", "run", str(path), "--storage", storage, "--runs-dir", str(tmp_path / "mlruns")])
    assert time.perf_counter() - t0 < 15
    text = r.output.strip()
    assert r.exit_code != 0 and text.startswith("error:") and len(text.splitlines()) == 1, text
    for w in words:
        assert w in text, text
