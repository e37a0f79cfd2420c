"""A look-up writes nothing; input is checked before any store is made (issue 19).

* Bad data fails before any store exists: ``topocam run``, ``study run``, ``study compare``,
  ``ablate`` and ``export`` check the data set (and the rest that needs no store) first, so a bad
  ``.npz`` leaves no ``mlflow.db`` or ``optuna.db`` behind.
* The commands that only read (``study status``, ``export``'s look-up, ``explain``) never make a
  store: one that is not there is a one-line error naming it.
* A read-only storage or cache can be read: ``study status`` of a read-only storage, ``topocam
  run`` and ``study run`` on a warm read-only cache; what must write says so in one line.

Read-only for real: the files and folders are ``chmod a-w`` and the command runs in a process
that the permission bits bind. The tests run as root in CI, whom permission bits do not stop
(CAP_DAC_OVERRIDE), so as root the command's process is started without CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH (dropped from its capability bounding set before exec: it stays uid 0, so the
interpreter under /root is still its own to read, but a read-only file or folder refuses it with
EACCES exactly as it refuses a user). A probe checks that the process really cannot write there.
"""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from typer.testing import CliRunner

from topocam.cli import app

from .test_study import write_study

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
RUN_FAST = ["--dataset", "synthetic2d", "--size", "16", "--synthetic-n", "40,16,16", "--backbone", "small", "--epochs", "2",
            "--batch-size", "16", "--seeds", "0", "--cam", "gradcam", "--bins", "8", "--mlp", "8,4", "--n-jobs", "1", "--quiet"]
ONE_TRIAL = {"study": {"n_trials": 1, "samplers": ["random"], "seeds": [0]}, "space": {"cam": {"choices": ["gradcam"]}}}


def _one_line_error(output: str, *words: str) -> None:
    assert output.startswith("error:") and len(output.strip().splitlines()) == 1, output
    assert "Traceback" not in output
    for w in words:
        assert w in output, (w, output)


def _tree(folder: Path) -> dict[str, int]:
    """Every path under ``folder`` with its modification time: what a read must leave as it is."""
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")}


# ------------------------------------------------------------ 4. bad data before any store

def _npz(path: Path, **override) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for s in ("train", "val", "test"):
        arrays[f"{s}_images"] = rng.integers(0, 255, (6, 16, 16)).astype(np.uint8)
        arrays[f"{s}_labels"] = np.array([0, 1, 0, 1, 0, 1])
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


BAD_NPZ = {
    "missing_key": ({"val_images": None, "test_labels": None}, "missing key(s) val_images, test_labels"),
    "wrong_shape": ({"val_images": np.zeros((6, 16), np.uint8)}, "val]: images have shape (6, 16)"),
    "label_count": ({"test_labels": np.array([0, 1, 0, 1, 0])}, "test has 6 images but 5 labels"),
    "label_range": ({"val_labels": np.array([0, 1, 0, 1, 0, 5])}, "class(es) [2, 3, 4, 5] never occur in the training split"),
    "negative_label": ({"train_labels": np.array([0, 1, 0, 1, 0, -1])}, "negative label -1"),
    "float_label": ({"train_labels": np.array([0, 1, 0, 1, 0, 0.5])}, "must be integer class indices"),
    "unreadable": (None, "cannot read as .npz"),
}


def _bad_npz(tmp_path: Path, kind: str) -> tuple[Path, str]:
    override, message = BAD_NPZ[kind]
    path = tmp_path / f"{kind}.npz"
    if override is None:
        path.write_bytes(b"PK\x03\x04 not a zip archive")
    else:
        _npz(path, **override)
    return path, message


@pytest.mark.parametrize("kind", sorted(BAD_NPZ))
def test_run_with_bad_npz_fails_in_one_line_before_any_store(tmp_path, kind):
    bad, message = _bad_npz(tmp_path, kind)
    runs, out = tmp_path / "runs", tmp_path / "out"
    r = runner.invoke(app, ["run", *RUN_FAST, "--dataset", str(bad), "--out", str(out), "--runs-dir", str(runs),
                            "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 2, r.output
    _one_line_error(r.output, str(bad), message)
    assert not runs.exists() and not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("argv", [
    ["study", "run", "STUDY"],
    ["study", "compare", "STUDY"],
    ["ablate", "STUDY", "--base", "file", "--seeds", "0"],
    ["export", "STUDY", "--name", "m"],
])
def test_study_commands_with_bad_npz_fail_before_any_store(tmp_path, argv):
    bad, message = _bad_npz(tmp_path, "label_range")
    study = write_study(tmp_path, "badnpz", data={"dataset": str(bad), "synthetic_n": None}, **ONE_TRIAL)
    runs = tmp_path / "runs"
    r = runner.invoke(app, [str(study) if a == "STUDY" else a for a in argv] + ["--runs-dir", str(runs), "--quiet"])
    assert r.exit_code == 2, r.output
    _one_line_error(r.output, str(bad), message)
    assert not runs.exists(), sorted(_tree(runs))


# ------------------------------------------------------------ 5. a look-up makes no store

def _study_storage(folder: Path, name: str = "look") -> str:
    """A real SQLite Optuna storage holding two (sampler, seed) studies of ``name``, one trial each."""
    url = f"sqlite:///{folder / 'optuna.db'}"
    for sampler, seed in (("random", 0), ("tpe", 1)):
        st = optuna.create_study(study_name=f"{name}.{sampler}.s{seed}", storage=url, direction="maximize")
        for k, v in {"topocam_study": name, "sampler": sampler, "seed": seed}.items():
            st.set_user_attr(k, v)
        st.optimize(lambda t, value=0.5 + 0.1 * seed: value, n_trials=1)
    return url


def test_status_of_a_missing_storage_is_one_line_and_makes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["study", "status", "look", "--storage", f"sqlite:///{empty / 'optuna.db'}"])
    assert r.exit_code == 2, r.output
    _one_line_error(r.output, f"no study storage at {empty / 'optuna.db'}; run a study first or pass --storage")
    assert _tree(empty) == {}
    r = runner.invoke(app, ["study", "status", "look", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "no study storage at" in r.output and not (tmp_path / "runs").exists()


def test_status_of_an_empty_file_or_another_file_is_not_a_storage(tmp_path):
    """A zero-byte optuna.db (touched, or cut short) is said to be no storage; it was given the schema."""
    db = tmp_path / "optuna.db"
    db.write_bytes(b"")
    r = runner.invoke(app, ["study", "status", "look", "--storage", f"sqlite:///{db}"])
    assert r.exit_code == 2, r.output
    _one_line_error(r.output, f"no study storage at {db} (no Optuna tables in it)")
    assert db.stat().st_size == 0 and _tree(tmp_path) == {"optuna.db": db.stat().st_mtime_ns}
    db.write_text("not a database at all, but long enough to have a header " * 4)
    r = runner.invoke(app, ["study", "status", "look", "--storage", f"sqlite:///{db}"])
    assert r.exit_code == 2
    _one_line_error(r.output, f"no study storage at {db} (not an SQLite database)")


def test_status_writes_nothing_not_even_a_lock(tmp_path):
    _study_storage(tmp_path)
    before = _tree(tmp_path)
    r = runner.invoke(app, ["study", "status", "look", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"])
    assert r.exit_code == 0, r.output
    assert "look.random.s0" in r.output and "look.tpe.s1" in r.output
    assert _tree(tmp_path) == before  # was: .optuna.db.topocam.lock beside it


def test_export_on_a_new_path_makes_no_store(tmp_path):
    study = write_study(tmp_path, "fresh", **ONE_TRIAL)
    new = tmp_path / "new"
    new.mkdir()
    r = runner.invoke(app, ["export", str(study), "--name", "m", "--storage", f"sqlite:///{new / 'optuna.db'}",
                            "--runs-dir", str(new), "--quiet"])
    assert r.exit_code == 2, r.output
    _one_line_error(r.output, f"no study storage at {new / 'optuna.db'}")
    assert _tree(new) == {}  # was: optuna.db and mlflow.db, then "no trials"
    r = runner.invoke(app, ["export", str(study), "--name", "m", "--runs-dir", str(tmp_path / "other"), "--quiet"])
    assert r.exit_code == 2 and "no study storage at" in r.output and not (tmp_path / "other").exists()


def test_export_of_a_study_without_trials_makes_no_mlflow_store(tmp_path):
    """The storage is there but holds no trials of this study: the look-up says so before the
    MLflow store (which the export would register the model in) is made."""
    _study_storage(tmp_path, name="someother")
    study = write_study(tmp_path, "fresh", **ONE_TRIAL)
    r = runner.invoke(app, ["export", str(study), "--name", "m", "--runs-dir", str(tmp_path), "--quiet"])
    assert r.exit_code == 2, r.output
    _one_line_error(r.output, "no trials of study 'fresh'")
    assert not (tmp_path / "mlflow.db").exists()


def test_explain_of_a_missing_tracking_store_makes_none(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["explain", "0123456789abcdef", "--tracking-uri", f"sqlite:///{empty / 'mlflow.db'}",
                            "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    assert r.exit_code == 2, r.output
    _one_line_error(r.output, f"no MLflow store at {empty / 'mlflow.db'}")
    assert _tree(empty) == {} and not (tmp_path / "runs").exists()


def test_status_of_an_empty_postgres_database_creates_no_tables(postgres):
    import sqlalchemy

    url = postgres.database("topocam_readonly_empty")
    r = runner.invoke(app, ["study", "status", "look", "--storage", url])
    assert r.exit_code == 2, r.output
    _one_line_error(r.output, "no study storage in", "(the database holds no Optuna tables)")
    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


# ------------------------------------------------------------ 6. read-only storage and cache

CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def _drop_file_permission_override() -> None:
    """In the child, before exec: a root process loses what lets it ignore permission bits."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap}) failed")


def as_reader(argv: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """``topocam ARGV`` in a process bound by file permissions (see the module doc), this tree's code."""
    child_env = {**os.environ, "PYTHONPATH": str(REPO), "TOPOCAM_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                 "MKL_NUM_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **env}
    for k in ("MLFLOW_TRACKING_URI", "TOPOCAM_STORAGE"):
        child_env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "topocam", *argv], cwd=cwd, env=child_env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_drop_file_permission_override if os.geteuid() == 0 else None)


def _read_only(*paths: Path) -> None:
    for top in paths:
        for p in [top, *top.rglob("*")] if top.is_dir() else [top]:
            p.chmod(stat.S_IMODE(p.stat().st_mode) & ~0o222)


@pytest.fixture
def read_only(tmp_path):
    """``read_only(*paths)``: make files and folders (recursively) read-only; writable again afterwards."""
    made: list[Path] = []

    def make(*paths: Path) -> None:
        made.extend(paths)
        _read_only(*paths)

    yield make
    for top in made:
        for p in [top, *top.rglob("*")] if top.is_dir() else [top]:
            p.chmod(stat.S_IMODE(p.stat().st_mode) | 0o200)


@pytest.fixture(scope="module")
def reader_can_not_write(tmp_path_factory):
    """The reader process really is refused a write in a read-only folder (else the tests below prove nothing)."""
    folder = tmp_path_factory.mktemp("probe") / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        probe = subprocess.run(
            [sys.executable, "-c", f"open({str(folder / 'x')!r}, 'w')"], capture_output=True, text=True, timeout=60,
            preexec_fn=_drop_file_permission_override if os.geteuid() == 0 else None,
        )
    except (OSError, subprocess.SubprocessError) as exc:  # prctl refused: no CAP_SETPCAP here
        pytest.skip(f"cannot start a process bound by file permissions here ({exc}): read-only tests skipped")
    finally:
        folder.chmod(0o755)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, "the reader process could write to a read-only folder"


def test_status_of_a_read_only_storage(tmp_path, read_only, reader_can_not_write):
    store = tmp_path / "store"
    store.mkdir()
    url = _study_storage(store)
    read_only(store)
    before = _tree(store)
    r = as_reader(["study", "status", "look", "--storage", url], cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # was: PermissionError ... .optuna.db.topocam.lock
    assert "look.random.s0" in r.stdout and "look.tpe.s1" in r.stdout
    assert _tree(store) == before


def test_a_worker_on_a_read_only_storage_says_what_needs_write_access(tmp_path, read_only, reader_can_not_write):
    store = tmp_path / "store"
    store.mkdir()
    url = _study_storage(store)
    read_only(store)
    study = write_study(tmp_path, "look", **ONE_TRIAL)
    runs = tmp_path / "runs"
    r = as_reader(["study", "run", str(study), "--storage", url, "--runs-dir", str(runs), "--quiet"], cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    db = store / "optuna.db"
    _one_line_error(r.stderr, f"cannot write the Optuna storage {db}: the file {db} is read-only",
                    "pass a writable --storage or --runs-dir")
    assert not (runs / "mlflow.db").exists()


def test_run_into_a_read_only_runs_folder_says_what_needs_write_access(tmp_path, read_only, reader_can_not_write):
    runs = tmp_path / "runs"
    runs.mkdir()
    read_only(runs)
    r = as_reader(["run", *RUN_FAST, "--out", str(tmp_path / "out"), "--runs-dir", str(runs),
                   "--cache-dir", str(tmp_path / "cache")], cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    _one_line_error(r.stderr, f"cannot write the MLflow tracking store {runs / 'mlflow.db'}: its folder {runs} is read-only")
    assert not (tmp_path / "cache").exists()  # refused before any training


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    """A cache filled by one tiny study (backbone, CNN probabilities, Grad-CAM maps), then the study file."""
    root = tmp_path_factory.mktemp("warm")
    cache = root / "cache"
    study = write_study(root, "warm", **ONE_TRIAL)
    mp = pytest.MonkeyPatch()
    mp.setenv("TOPOCAM_CACHE_DIR", str(cache))
    try:
        r = runner.invoke(app, ["study", "run", str(study), "--runs-dir", str(root / "runs"), "--quiet"])
    finally:
        mp.undo()
    assert r.exit_code == 0, r.output
    return cache, study


@pytest.fixture
def read_only_warm_cache(warm_cache, read_only):
    cache, study = warm_cache
    read_only(cache)
    return cache, study


def test_study_run_on_a_warm_read_only_cache(tmp_path, read_only_warm_cache, reader_can_not_write):
    cache, study = read_only_warm_cache
    before = _tree(cache)
    r = as_reader(["study", "run", str(study), "--runs-dir", str(tmp_path / "runs"), "--quiet"], cwd=tmp_path,
                  TOPOCAM_CACHE_DIR=str(cache))
    assert r.returncode == 0, r.stdout + r.stderr  # was: "cache folder ...: ... is not writable"
    assert "1 trials (0 failed)" in r.stdout, r.stdout
    assert _tree(cache) == before


def test_run_on_a_warm_read_only_cache(tmp_path, read_only_warm_cache, reader_can_not_write):
    cache, _ = read_only_warm_cache
    before = _tree(cache)
    r = as_reader(["run", *RUN_FAST, "--out", str(tmp_path / "out"), "--cache-dir", str(cache), "--no-tracking"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ", cached)" in r.stdout, r.stdout  # the study's backbone, read from the cache
    assert (tmp_path / "out" / "metrics.json").is_file() and _tree(cache) == before


def test_run_on_a_cold_read_only_cache_says_what_needs_write_access(tmp_path, read_only, reader_can_not_write):
    cache = tmp_path / "cache"
    cache.mkdir()
    read_only(cache)
    r = as_reader(["run", *RUN_FAST, "--out", str(tmp_path / "out"), "--cache-dir", str(cache), "--no-tracking"], cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    _one_line_error(r.stderr, f"cache entry {cache / 'backbones'}", f"is not built yet, and building it needs write access to {cache} ",
                    "choose a writable --cache-dir")
    assert _tree(cache) == {} and not (tmp_path / "out").exists()
