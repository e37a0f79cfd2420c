"""What is stored is what was scored (issue 19): a study records the fingerprint of the data
its trials were scored on, and export, ablate, explain and a resumed study refuse other data
before anything trains; a refit that does not reproduce the search's validation numbers is
refused; one study name holds one definition, whatever the sampler, seed or arm; an objective
the data's labels cannot give is refused before the first trial, and a study that ends with
no finite objective exits non-zero.

Real components: an .npz in the MedMNIST layout on disk, SQLite Optuna storages, SQLite MLflow
stores with their model registry, the CLI (``topocam.cli.app`` through Typer's CliRunner), the
pipeline on 16-px synthetic lesions with a 2-epoch small CNN. One backbone/CAM cache serves
the module (the unchanged file trains its backbone once); "nothing trained" is checked as
"nothing new in the cache".
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from typer.testing import CliRunner

from topocam.cli import app
from topocam.core.data import load_npz, make_synthetic

from .test_study import write_study

ATTR_DATA = "topocam_data_fingerprint"  # the Optuna study user attribute that records the data's fingerprint

SPACE = {"cam": {"choices": ["gradcam"]}}  # one CAM variant: less to build
STUDY = {"n_trials": 2, "samplers": ["tpe", "random"], "seeds": [0]}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch

    cache = tmp_path_factory.mktemp("integrity-cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setenv("TOPOCAM_CACHE_DIR", str(cache))
    mp.setenv("TOPOCAM_OFFLINE", "1")
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        yield SimpleNamespace(cache=cache)
    finally:
        mp.undo()
        torch.set_num_threads(threads)


def write_npz(path: Path, change: str = "") -> Path:
    """Synthetic 16-px lesions as uint8 images in the MedMNIST npz layout. ``change``:
    "relabel" flips every label and reorders every split; "one_class_val" makes every
    validation label 0."""
    ds = make_synthetic(2, size=16, n=(40, 16, 16), seed=0)
    arrays = {}
    for s in ("train", "val", "test"):
        x = np.round(np.asarray(ds.x[s])[:, 0] * 255).astype(np.uint8)
        y = ds.y[s].copy()
        if change == "relabel":
            order = np.random.default_rng(5).permutation(len(y))
            x, y = x[order], 1 - y[order]
        if change == "one_class_val" and s == "val":
            y[:] = 0
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = x, y.reshape(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def study_on(folder: Path, npz: Path, name: str = "tiny", file: str | None = None, **changes) -> Path:
    data = {"dataset": str(npz), "synthetic_n": None, **changes.pop("data", {})}
    path = write_study(folder, name, study={**STUDY, **changes.pop("study", {})}, data=data, space=SPACE, **changes)
    if file:
        path = path.rename(folder / f"{file}.toml")
    return path


def cli(*args: str):
    return CliRunner().invoke(app, [*args, "--quiet"])


def one_line_error(r) -> str:
    text = r.output.strip()
    assert r.exit_code != 0, r.output
    assert "Traceback" not in text, text
    line = text.splitlines()[-1]
    assert line.startswith("error:"), text
    return line


def cache_files(env) -> set[str]:
    return {str(p.relative_to(env.cache)) for p in env.cache.rglob("*") if p.is_file()}


def optuna_studies(runs: Path) -> dict[str, dict]:
    storage = optuna.storages.RDBStorage(f"sqlite:///{runs / 'optuna.db'}")
    return {s.study_name: s.user_attrs for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}


def registered(runs: Path) -> list[str]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{runs / 'mlflow.db'}"
    return [m.name for m in MlflowClient(uri, registry_uri=uri).search_registered_models()]


# ------------------------------------------------- 1. the data a study was scored on


def test_changed_data_is_refused_before_anything_trains(env, tmp_path):
    npz = write_npz(tmp_path / "data" / "good.npz")
    study, runs = study_on(tmp_path, npz), tmp_path / "runs"
    r = cli("study", "run", str(study), "--sampler", "tpe", "--runs-dir", str(runs))
    assert r.exit_code == 0, r.output
    good = load_npz(npz).fingerprint
    assert optuna_studies(runs)["tiny.tpe.s0"][ATTR_DATA] == good  # recorded when the study was created

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    (sampler_run,) = client.search_runs([exp.experiment_id], "tags.kind = 'sampler'")
    assert sampler_run.data.tags["data_fingerprint"] == good  # what explain checks a study run's data against
    (best,) = client.search_runs([exp.experiment_id], "tags.kind = 'best'")

    write_npz(npz, "relabel")  # the same file, relabelled and reordered
    changed = load_npz(npz).fingerprint
    assert changed != good
    before = cache_files(env)

    r = cli("export", str(study), "--name", "M", "--runs-dir", str(runs))
    line = one_line_error(r)
    assert good in line and changed in line and str(npz) in line, line
    assert "tiny.tpe.s0" in line
    assert registered(runs) == []

    for args in (
        ["study", "run", str(study), "--sampler", "tpe", "--n-trials", "3"],  # resuming it
        ["study", "run", str(study), "--sampler", "random"],  # another search under its name
    ):
        line = one_line_error(cli(*args, "--runs-dir", str(runs)))
        assert good in line and changed in line and str(npz) in line, line
    assert set(optuna_studies(runs)) == {"tiny.tpe.s0"}
    assert len(optuna.load_study(study_name="tiny.tpe.s0", storage=f"sqlite:///{runs / 'optuna.db'}").trials) == 2

    suite = tmp_path / "suite.toml"
    suite.write_text('[[ablation]]\nname = "tau"\narms = [{ arm = "0.5", tau = 0.5 }]\n')
    line = one_line_error(cli("ablate", str(study), "--suite", str(suite), "--seeds", "0", "--no-figures", "--runs-dir", str(runs)))
    assert good in line and changed in line and str(npz) in line, line

    line = one_line_error(cli("explain", best.info.run_id, "--runs-dir", str(runs), "--no-log"))
    assert good in line and changed in line and str(npz) in line, line

    assert cache_files(env) == before, "a backbone or CAMs were built for the changed data"


def test_a_study_without_a_fingerprint_warns_and_a_refit_that_differs_is_refused(env, tmp_path):
    npz = write_npz(tmp_path / "data" / "good.npz")
    study, runs = study_on(tmp_path, npz), tmp_path / "runs"
    r = cli("study", "run", str(study), "--sampler", "tpe", "--runs-dir", str(runs))
    assert r.exit_code == 0, r.output
    with sqlite3.connect(runs / "optuna.db") as con:  # what a study created before the fingerprint was recorded holds
        assert con.execute("DELETE FROM study_user_attributes WHERE key = ?", (ATTR_DATA,)).rowcount == 1

    r = cli("study", "run", str(study), "--sampler", "tpe", "--n-trials", "3", "--runs-dir", str(runs))  # resumed: said, and on
    assert r.exit_code == 0, r.output
    warned = [ln for ln in r.output.splitlines() if "records no dataset fingerprint" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning:") and "tiny.tpe.s0" in warned[0], r.output
    assert ATTR_DATA not in optuna_studies(runs)["tiny.tpe.s0"]  # not claimed afterwards: its first trials saw unknown data

    write_npz(npz, "relabel")
    # the relabelled data train another backbone: its digest is not the one the trials recorded
    line = one_line_error(cli("export", str(study), "--name", "M", "--runs-dir", str(runs)))
    assert "was scored on backbone sha256" in line and "nothing was registered" in line, line
    with sqlite3.connect(runs / "optuna.db") as con:  # trials scored before digests were recorded: the refit decides
        assert con.execute("DELETE FROM trial_user_attributes WHERE key IN ('backbone_sha256', 'cam_sha256')").rowcount > 0
    r = cli("export", str(study), "--name", "M", "--runs-dir", str(runs))
    assert sum("records no dataset fingerprint" in ln for ln in r.output.splitlines()) == 1, r.output
    line = one_line_error(r)
    assert "the refit of tiny.tpe.s0 trial" in line and "tolerance 1e-06" in line and "AUC" in line, line
    assert "nothing was registered" in line
    assert registered(runs) == []


# ---------------------------------------------------- 2. one name, one definition


def test_one_study_name_holds_one_definition_whatever_the_sampler_seed_or_arm(env, tmp_path):
    npz = write_npz(tmp_path / "data" / "good.npz")
    runs = tmp_path / "runs"
    tiny = study_on(tmp_path, npz)
    (tmp_path / "other").mkdir()
    same = study_on(tmp_path / "other", npz, file="sametiny", data={"size": 20})  # [study] name "tiny" too
    assert same.name == "sametiny.toml" and 'name = "tiny"' in same.read_text()
    r = cli("study", "run", str(tiny), "--sampler", "tpe", "--runs-dir", str(runs))
    assert r.exit_code == 0, r.output
    # the Topo-Original arm's definition differs by construction (no ROI parameters): compared arm with arm
    r = cli("study", "run", str(tiny), "--sampler", "random", "--arm", "topo_original", "--runs-dir", str(runs))
    assert r.exit_code == 0, r.output
    assert set(optuna_studies(runs)) == {"tiny.tpe.s0", "tiny-topo_original.random.s0"}

    before = cache_files(env)
    for args in (["--sampler", "random"], ["--sampler", "tpe", "--seed", "1"], ["--sampler", "tpe", "--arm", "topo_original"]):
        line = one_line_error(cli("study", "run", str(same), *args, "--runs-dir", str(runs)))
        assert "base.size: 16 -> 20" in line and str(same) in line and "'tiny" in line, line
        assert "'tiny.tpe.s0'" in line or "'tiny-topo_original.random.s0'" in line, line
    line = one_line_error(cli("study", "compare", str(same), "--samplers", "random", "--seeds", "1", "--runs-dir", str(runs)))
    assert "base.size: 16 -> 20" in line, line
    assert set(optuna_studies(runs)) == {"tiny.tpe.s0", "tiny-topo_original.random.s0"}  # nothing created
    assert cache_files(env) == before


# -------------------------------------------- 3. an objective that cannot be computed


def test_an_objective_the_labels_cannot_give_is_refused_before_training(env, tmp_path):
    npz = write_npz(tmp_path / "data" / "onecls.npz", "one_class_val")
    study, runs = study_on(tmp_path, npz, name="onecls"), tmp_path / "runs"
    before = cache_files(env)
    for args in (["study", "run", str(study), "--sampler", "tpe"],
                 ["study", "compare", str(study), "--samplers", "tpe", "--seeds", "1"]):
        line = one_line_error(cli(*args, "--runs-dir", str(runs)))
        assert "val_auc" in line and "validation split" in line and str(npz) in line, line
        assert '"val_acc"' in line and '"cv_auc"' in line, line
    assert optuna_studies(runs) == {}  # no trial, no study
    assert cache_files(env) == before  # no backbone
    # the objectives these labels do give are accepted
    from topocam.search.runner import check_objective
    from topocam.search.studyfile import load_study

    for objective in ("val_acc", "cv_auc"):
        check_objective(load_study(study_on(tmp_path, npz, name=f"ok{objective}", study={"objective": objective})), load_npz(npz))


def test_a_study_that_ends_with_no_finite_objective_exits_nonzero(env, tmp_path, monkeypatch):
    from topocam.search import runner as runner_mod

    def broken(*a, **k):
        raise RuntimeError("every configuration fails here")

    npz = write_npz(tmp_path / "data" / "good.npz")
    study, runs = study_on(tmp_path, npz, name="nofinite"), tmp_path / "runs"
    monkeypatch.setattr(runner_mod, "evaluate", broken)  # every trial's configuration raises
    r = cli("study", "run", str(study), "--sampler", "tpe", "--runs-dir", str(runs))
    assert r.exit_code == 1, r.output
    assert "best val AUC — at trial -1" in r.output  # the summary is still printed
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error:") and "no trial with a finite val_auc" in line and "tpe, seed 0" in line, r.output

    r = cli("study", "compare", str(study), "--samplers", "random", "--seeds", "1", "--runs-dir", str(runs),
            "--out", str(tmp_path / "cmp"))
    assert r.exit_code == 1, r.output
    assert (tmp_path / "cmp" / "comparison.md").is_file()  # the table is written and printed
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error:") and "no trial with a finite val_auc" in line, r.output
    assert "nofinite.random.s0" in line and "nofinite-topo_original.random.s0" in line, line
