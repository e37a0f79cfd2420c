"""Many workers on one study: a private PostgreSQL server (conftest ``postgres``), Optuna's
journal file, worker processes started through the CLI, killed and interrupted ones.

Workers are real processes (``python cli.py study run ...``) on the tiny synthetic study of
tests/test_study.py, sharing one backbone/CAM cache built once by the ``warm`` fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from topocam.search.storage import open_storage
from topocam.stores import parse_store_url

from .test_study import write_study

REPO = Path(__file__).resolve().parents[1]
S = optuna.trial.TrialState


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One backbone/CAM cache for every worker, built here once."""
    from topocam.pipeline import prepare
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
def test_three_workers_on_postgresql_finish_exactly_the_budget(env, postgres, tmp_path):
    """Three processes join one DE study on PostgreSQL: exactly n_trials trials, all complete,
    each DE (generation, slot) built once from its own trial number, no duplicate individual."""
    url = postgres.database("three")
    study = write_study(tmp_path, "pgworkers")
    n = 8  # two generations of the population of 4
    procs = [start_worker(env, tmp_path, study, "--sampler", "de", "--seed", "0", "--n-trials", str(n), "--storage", url)
             for _ in range(3)]
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
