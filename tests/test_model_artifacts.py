"""One model per study on every machine (issue 20): the backbone, CNN probabilities and CAMs
are digested (core/artifacts.py), published once to MLflow and recorded in the Optuna storage
(search/artifacts.py); workers fetch and verify them, and score every trial on that one model.

The slow tests run real worker processes (``python cli.py study ...``) against a private
PostgreSQL (conftest ``postgres``) and a real ``mlflow server`` (``mlflow_server``,
``own_mlflow_server``), each worker with a cache of its own (``TOPOCAM_CACHE_DIR``), as
separate machines would be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from topocam.core.artifacts import Artifact, entry_digest, install_entry, model_entries, verify_entry
from topocam.core.errors import TopoCAMError

from .test_scale_out import REPO, finish, start_worker, trials_of, worker_env
from .test_study import write_study

S = optuna.trial.TrialState
# a configuration of the tiny study's space (tests/test_study.py BASE), enqueued so workers score the same one
PARAMS = {"w_layer2": 0.5, "w_layer3": 0.3, "w_layer4": 0.2, "tau": 0.4, "cam": "gradcampp", "mlp_h1": 9, "mlp_h2": 7}


# ------------------------------------------------------------------ digests (core)


def test_a_folder_digest_changes_with_any_file_and_not_with_where_it_lies(tmp_path):
    for where in ("a", "b"):
        (tmp_path / where / "x").mkdir(parents=True)
        (tmp_path / where / "x" / "m.npy").write_bytes(b"\x00" * 64)
        (tmp_path / where / "complete").write_text("ok\n")
    assert entry_digest(tmp_path / "a") == entry_digest(tmp_path / "b")
    (tmp_path / "b" / "x" / "m.npy").write_bytes(b"\x00" * 63 + b"\x01")
    assert entry_digest(tmp_path / "a")[0] != entry_digest(tmp_path / "b")[0]
    assert entry_digest(tmp_path / "a")[1] == 64 + 3


def test_a_local_entry_that_disagrees_is_an_error_naming_both_digests(tmp_path):
    (tmp_path / "backbones").mkdir()
    (tmp_path / "backbones" / "k.pt").write_bytes(b"weights A")
    mine = entry_digest(tmp_path / "backbones" / "k.pt")[0]
    published = Artifact("backbones/k.pt", "f" * 64, 9)
    with pytest.raises(TopoCAMError) as exc:
        verify_entry(tmp_path, published)
    assert mine[:16] in str(exc.value) and "f" * 16 in str(exc.value)
    assert verify_entry(tmp_path, Artifact("backbones/k.pt", mine, 9)) is True
    assert verify_entry(tmp_path, Artifact("backbones/absent.pt", mine, 9)) is False


def test_a_damaged_download_is_refused_and_leaves_the_cache_as_it_was(tmp_path):
    src = tmp_path / "dl.pt"
    src.write_bytes(b"damaged")
    cache = tmp_path / "cache"
    with pytest.raises(TopoCAMError, match="damaged"):
        install_entry(cache, Artifact("backbones/k.pt", "0" * 64, 7), src)
    assert not (cache / "backbones" / "k.pt").exists()
    good = Artifact("backbones/k.pt", *entry_digest(src))
    install_entry(cache, good, src)
    assert (cache / "backbones" / "k.pt").read_bytes() == b"damaged" and not src.exists()


def test_model_entries_name_what_prepare_and_the_cams_write(ctx2d, cache_dir):
    ctx = ctx2d
    ctx.cams("gradcam", "train")
    entries = model_entries(ctx.config, ctx.data, ("gradcam",))
    for e in entries.all:
        assert (Path(cache_dir) / e).exists(), e
    assert entries.backbone == f"backbones/{ctx.backbone.cache_key}.pt"
    assert Path(cache_dir, entries.cams["gradcam"]) == ctx.store.root / "gradcam"


# ------------------------------------------------------------------ one machine, in process


def _runner(study: Path, storage: str, tracking: str, runs: Path, log: list[str]):
    from topocam.search.runner import StudyRunner
    from topocam.search.studyfile import load_study

    return StudyRunner.open(load_study(study), storage, tracking, runs, progress=False, log=log.append)


def test_prepare_publishes_and_a_worker_with_an_empty_cache_fetches_the_same_model(tmp_path, monkeypatch):
    """SQLite storage, local MLflow store: ``prepare`` publishes; a worker on another cache
    fetches every entry, trains nothing, computes no CAM, and its trials record the digests."""
    monkeypatch.setenv("TOPOCAM_OFFLINE", "1")
    study = write_study(tmp_path, "pubfetch")
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("TOPOCAM_CACHE_DIR", str(tmp_path / "cache-gpu"))
    log: list[str] = []
    models = _runner(study, storage, tracking, tmp_path, log).prepare_model()
    (model,) = models
    assert model.how == "built" and set(model.artifacts) == set(model.entries.all)
    rec = optuna.load_study(study_name="pubfetch.model", storage=storage).user_attrs["model_artifacts:s0"]
    assert {e: a["sha256"] for e, a in rec["entries"].items()} == {e: a.sha256 for e, a in model.artifacts.items()}

    monkeypatch.setenv("TOPOCAM_CACHE_DIR", str(tmp_path / "cache-cpu"))
    log.clear()
    worker = _runner(study, storage, tracking, tmp_path, log)
    r = worker.run("random", 0, 2)
    assert worker.models[0].how == "fetched", log
    assert not [k for k in worker.ctx.timings_s if k.startswith("cams_")] and worker.ctx.backbone.cached
    assert any("fetched" in m and "trained no backbone and computed no CAM" in m for m in log), log
    for e, a in model.artifacts.items():
        assert entry_digest(tmp_path / "cache-cpu" / e)[0] == a.sha256
    trials = [t for t in optuna.load_study(study_name="pubfetch.random.s0", storage=storage).trials]
    assert len(trials) == 2 == len(r.values)
    for t in trials:
        assert t.user_attrs["backbone_sha256"] == model.artifacts[model.entries.backbone].sha256
        assert t.user_attrs["cam_sha256"] == model.artifacts[model.entries.cams[t.params["cam"]]].sha256
    st = optuna.load_study(study_name="pubfetch.random.s0", storage=storage)
    assert st.user_attrs["model_artifacts:s0"] == rec  # the Optuna study names the model its trials saw
    from topocam.search.status import study_status

    assert [r["study"] for r in study_status("pubfetch", storage)] == ["pubfetch.random.s0"]
    with pytest.raises(TopoCAMError, match="studies there: pubfetch$"):  # the model's record study is no study of its own
        study_status("other", storage)

    # a local entry that disagrees with the published digest: an error naming both, no silent retrain
    probs = tmp_path / "cache-cpu" / model.entries.probs
    probs.write_bytes(probs.read_bytes() + b"x")
    with pytest.raises(TopoCAMError) as exc:
        _runner(study, storage, tracking, tmp_path, []).run("random", 0, 3)
    assert rec["entries"][model.entries.probs]["sha256"][:16] in str(exc.value)
    assert entry_digest(probs)[0][:16] in str(exc.value)
    assert len(optuna.load_study(study_name="pubfetch.random.s0", storage=storage).trials) == 2


def test_explain_redraws_a_trial_on_the_published_model_and_refuses_another(tmp_path, monkeypatch):
    """``topocam explain`` of a study's trial on a machine with an empty cache fetches the study's
    published model (trains no backbone, computes no CAM) and re-computes the trial's validation
    metrics; a local backbone that disagrees with the published one is an error naming both digests."""
    from mlflow import MlflowClient

    from topocam.report.explain import explain_run
    from topocam.tracking import Tracker

    monkeypatch.setenv("TOPOCAM_OFFLINE", "1")
    study = write_study(tmp_path, "explained")
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("TOPOCAM_CACHE_DIR", str(tmp_path / "cache-gpu"))
    (model,) = _runner(study, storage, tracking, tmp_path, []).prepare_model()
    _runner(study, storage, tracking, tmp_path, []).run("random", 0, 1)
    (trial_run,) = MlflowClient(tracking).search_runs(
        [MlflowClient(tracking).get_experiment_by_name("explained").experiment_id], "tags.kind = 'trial'")
    assert trial_run.data.tags["backbone_sha256"] == model.artifacts[model.entries.backbone].sha256

    monkeypatch.setenv("TOPOCAM_CACHE_DIR", str(tmp_path / "cache-laptop"))

    def forbidden(*args, **kwargs):
        raise AssertionError("explain trained a backbone of its own")

    from topocam.core import pipeline

    computed: list[str] = []  # CAM variants explain computed here (its ROI-quality figure covers every variant)

    def spy(model, x, variant, *args, **kwargs):
        computed.append(variant)
        return compute_cams(model, x, variant, *args, **kwargs)

    compute_cams = pipeline.compute_cams
    with monkeypatch.context() as m:
        m.setattr("topocam.core.backbone._fit", forbidden)
        m.setattr("topocam.core.pipeline.compute_cams", spy)
        res = explain_run(Tracker(tracking, tmp_path), trial_run.info.run_id, tmp_path / "figs", log=False,
                          progress=False, storage_url=storage)
    assert res.mismatches == [] and res.files
    assert computed and not set(computed) & set(model.entries.cams)  # the published variants were fetched, not made
    for e, a in model.artifacts.items():  # every entry came from the store, as published
        assert entry_digest(tmp_path / "cache-laptop" / e)[0] == a.sha256

    from dataclasses import replace

    from topocam.core.pipeline import prepare
    from topocam.search.studyfile import load_study

    other = prepare(replace(load_study(study).base, seed=7, cache_dir=str(tmp_path / "other")), progress=False)
    backbone = tmp_path / "cache-laptop" / model.entries.backbone
    backbone.write_bytes((tmp_path / "other" / "backbones" / f"{other.backbone.cache_key}.pt").read_bytes())
    with pytest.raises(TopoCAMError) as exc:
        explain_run(Tracker(tracking, tmp_path), trial_run.info.run_id, tmp_path / "figs2", log=False,
                    progress=False, storage_url=storage)
    assert model.artifacts[model.entries.backbone].sha256[:16] in str(exc.value)
    assert entry_digest(backbone)[0][:16] in str(exc.value)


def test_export_refuses_a_backbone_other_than_the_one_the_trial_saw(tmp_path, monkeypatch):
    from topocam.search.artifacts import Model, check_trial_model
    from topocam.core.artifacts import ModelEntries

    entries = ModelEntries(0, "backbones/k.pt", "backbones/k.probs.npz", {})
    model = Model(0, entries, {"backbones/k.pt": Artifact("backbones/k.pt", "a" * 64, 1)}, "fetched")
    check_trial_model(model, {"backbone_sha256": "a" * 64}, "trial 0")
    with pytest.raises(TopoCAMError, match="nothing was registered") as exc:
        check_trial_model(model, {"backbone_sha256": "b" * 64}, "trial 0")
    assert "a" * 16 in str(exc.value) and "b" * 16 in str(exc.value)


# ------------------------------------------------------------------ many machines: real processes


@pytest.fixture
def caches(tmp_path) -> SimpleNamespace:
    return SimpleNamespace(cache=tmp_path / "cache-unused")


def _cli(args: list[str], folder: Path, cache: Path, **extra: str) -> subprocess.Popen:
    env = worker_env(SimpleNamespace(cache=cache), **extra)
    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _prepare(study: Path, folder: Path, cache: Path, url: str, tracking: str) -> str:
    p = _cli(["study", "prepare", str(study), "--storage", url, "--tracking-uri", tracking, "--runs-dir",
              str(folder / "mlruns"), "--quiet"], folder, cache)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    return out


def _enqueue(url: str, name: str, times: int) -> None:
    from topocam.search.storage import open_storage

    st = optuna.create_study(study_name=name, storage=open_storage(url), direction="maximize", load_if_exists=True)
    for _ in range(times):
        st.enqueue_trial(PARAMS)


@pytest.mark.slow
def test_two_workers_with_different_thread_counts_and_caches_score_one_model(caches, postgres, mlflow_server, tmp_path):
    """Issue 20's test: one PostgreSQL study, one MLflow server, two workers with OMP_NUM_THREADS=1
    and =2 and caches of their own, no ``prepare``: the first builds and publishes, the second
    fetches; both evaluate the same enqueued configuration, record the same backbone and CAM
    digests and get the same objective value, exactly. (On main each trained its own backbone:
    weights apart by up to 0.023, validation AUCs 0.755 and 0.778.)"""
    url = postgres.database("threads")
    study = write_study(tmp_path, "threads")
    _enqueue(url, "threads.random.s0", 2)
    outs = []
    for threads, budget in (("1", "1"), ("2", "2")):
        cache = tmp_path / f"cache-{threads}threads"
        w = start_worker(caches, tmp_path, study, "--sampler", "random", "--seed", "0", "--n-trials", budget, "--storage", url,
                         "--tracking-uri", mlflow_server, TOPOCAM_CACHE_DIR=str(cache), OMP_NUM_THREADS=threads,
                         MKL_NUM_THREADS=threads)
        outs += finish([w])
        assert w.returncode == 0, outs[-1]
    trials = trials_of(url, "threads.random.s0")
    diag = "\n".join(o[-2000:] for o in outs) + f"\n{[(t.number, t.state, t.params, t.value) for t in trials]}"
    assert [t.state for t in trials] == [S.COMPLETE, S.COMPLETE], diag
    assert trials[0].params == trials[1].params == PARAMS, diag
    assert trials[0].value == trials[1].value, diag  # exactly: one model, one objective
    for key in ("backbone_sha256", "cam_sha256"):
        assert trials[0].user_attrs[key] == trials[1].user_attrs[key], diag
    assert "model of threads: built" in outs[0] and "model of threads: fetched" in outs[1], diag
    assert "trained no backbone and computed no CAM" in outs[1], diag
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("threads").experiment_id
    runs = client.search_runs([exp], "tags.kind = 'trial'")
    assert sorted(r.data.tags["repro_threads"] for r in runs) == ["1", "2"], diag  # the thread counts did differ
    assert {r.data.tags["backbone_sha256"] for r in runs} == {trials[0].user_attrs["backbone_sha256"]}
    published = client.search_runs([exp], "tags.kind = 'model-artifacts'")
    assert len(published) == 1 and published[0].data.tags["state"] == "complete", diag


@pytest.mark.slow
def test_prepare_then_three_workers_train_nothing_and_finish_the_budget(caches, postgres, mlflow_server, tmp_path):
    url = postgres.database("prepared")
    study = write_study(tmp_path, "prepared")
    out = _prepare(study, tmp_path, tmp_path / "cache-gpu", url, mlflow_server)
    assert "published 4 entries" in out and "built" in out, out
    n = 6
    procs = [start_worker(caches, tmp_path, study, "--sampler", "random", "--seed", "0", "--n-trials", str(n), "--storage", url,
                          "--tracking-uri", mlflow_server, TOPOCAM_CACHE_DIR=str(tmp_path / f"cache-cpu{i}")) for i in range(3)]
    outs = finish(procs)
    trials = trials_of(url, "prepared.random.s0")
    diag = "\n".join(f"--- worker {i}:\n{o[-1500:]}" for i, o in enumerate(outs))
    assert all(p.returncode == 0 for p in procs), diag
    assert [t.number for t in trials] == list(range(n)) and all(t.state == S.COMPLETE for t in trials), diag
    for o in outs:  # every worker fetched the published model: no backbone trained, no CAM computed
        assert "model of prepared: fetched" in o and "trained no backbone and computed no CAM" in o, diag
    assert len({t.user_attrs["backbone_sha256"] for t in trials}) == 1, diag


@pytest.mark.slow
def test_workers_started_together_without_prepare_build_the_model_once(caches, postgres, mlflow_server, tmp_path):
    """No ``prepare``: one of two workers started together (caches of their own) builds and
    publishes under the storage's lock, the other waits and fetches; one published run."""
    url = postgres.database("together")
    study = write_study(tmp_path, "together")
    procs = [start_worker(caches, tmp_path, study, "--sampler", "random", "--seed", "0", "--n-trials", "4", "--storage", url,
                          "--tracking-uri", mlflow_server, TOPOCAM_CACHE_DIR=str(tmp_path / f"cache-{i}")) for i in range(2)]
    outs = finish(procs)
    diag = "\n".join(o[-1500:] for o in outs)
    assert all(p.returncode == 0 for p in procs), diag
    hows = sorted("built" if "model of together: built" in o else "fetched" if "model of together: fetched" in o else "?" for o in outs)
    assert hows == ["built", "fetched"], diag
    trials = trials_of(url, "together.random.s0")
    assert [t.state for t in trials] == [S.COMPLETE] * 4 and len({t.user_attrs["backbone_sha256"] for t in trials}) == 1, diag
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id], "tags.kind = 'model-artifacts'")
    assert [r.data.tags["state"] for r in runs] == ["complete"], diag


# faults ------------------------------------------------------------------

# a publisher that dies mid-upload: the real CLI, its uploads slowed after the first (a test-only
# hook; the product has none), so the test can SIGKILL it between two uploads
SLOW_PUBLISHER = """
import os, sys, time
sys.path.insert(0, {repo!r})
import topocam.tracking.tracker as tracker
real = tracker.Tracker.log_artifact
def slow(self, run_id, path, artifact_path=None):
    real(self, run_id, path, artifact_path)
    open(os.environ["UPLOAD_LOG"], "a").write("uploaded\\n")
    time.sleep(300)
tracker.Tracker.log_artifact = slow
from topocam.cli import main
main()
"""


@pytest.mark.slow
def test_a_publisher_killed_mid_upload_leaves_nothing_a_worker_takes_and_the_next_one_publishes(
        caches, postgres, own_mlflow_server, tmp_path):
    url, tracking = postgres.database("killed"), own_mlflow_server.start()
    study = write_study(tmp_path, "killed")
    script, log = tmp_path / "slow_publisher.py", tmp_path / "uploads.log"
    script.write_text(SLOW_PUBLISHER.format(repo=str(REPO)))
    env = worker_env(SimpleNamespace(cache=tmp_path / "cache-a"), UPLOAD_LOG=str(log))
    p = subprocess.Popen([sys.executable, str(script), "study", "prepare", str(study), "--storage", url, "--tracking-uri", tracking,
                          "--runs-dir", str(tmp_path / "mlruns"), "--quiet"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (log.exists() and log.read_text()):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0]
        time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    from topocam.search.storage import open_storage

    attrs = [s.user_attrs for s in optuna.get_all_study_summaries(open_storage(url), include_best_trial=False)]
    assert not any(k.startswith("model_artifacts") for a in attrs for k in a), attrs  # nothing recorded: nothing a worker takes
    w = start_worker(caches, tmp_path, study, "--sampler", "random", "--seed", "0", "--n-trials", "2", "--storage", url,
                     "--tracking-uri", tracking, TOPOCAM_CACHE_DIR=str(tmp_path / "cache-b"))
    (out,) = finish([w])
    assert w.returncode == 0, out
    assert "model of killed: built" in out, out
    trials = trials_of(url, "killed.random.s0")
    assert [t.state for t in trials] == [S.COMPLETE] * 2, out
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("killed").experiment_id], "tags.kind = 'model-artifacts'")
    states = sorted(r.data.tags["state"] for r in runs)
    assert states == ["complete", "uploading"], states  # the half-uploaded run is left, never referenced
    record = optuna.load_study(study_name="killed.model", storage=open_storage(url)).user_attrs["model_artifacts:s0"]
    assert record["run_id"] == next(r.info.run_id for r in runs if r.data.tags["state"] == "complete")


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_an_artifact_deleted_or_corrupted_in_the_store_is_named_and_repaired_under_the_lock(
        caches, postgres, own_mlflow_server, tmp_path, damage):
    url, tracking = postgres.database(f"damaged{damage}"), own_mlflow_server.start()
    study = write_study(tmp_path, "damaged")
    _prepare(study, tmp_path, tmp_path / "cache-gpu", url, tracking)
    (npy,) = [p for p in (own_mlflow_server.root / "artifacts").rglob("gradcampp/train/layer3.npy")]
    if damage == "deleted":
        npy.unlink()
    else:
        a = np.load(npy)
        a.flat[0] += 1.0
        np.save(npy, a)
    w = start_worker(caches, tmp_path, study, "--sampler", "random", "--seed", "0", "--n-trials", "2", "--storage", url,
                     "--tracking-uri", tracking, TOPOCAM_CACHE_DIR=str(tmp_path / "cache-cpu"))
    (out,) = finish([w])
    assert w.returncode == 0, out
    line = next((ln for ln in out.splitlines() if "repairing it under the lock" in ln), None)
    assert line is not None and "gradcampp" in line, out
    print(f"{damage}: {line}")
    assert "model of damaged: built" in out and "trained no backbone" in out, out  # the CAM rebuilt on the published backbone
    assert [t.state for t in trials_of(url, "damaged.random.s0")] == [S.COMPLETE] * 2, out
    # the repaired model is published again: a third machine fetches it whole
    w = start_worker(caches, tmp_path, study, "--sampler", "random", "--seed", "0", "--n-trials", "3", "--storage", url,
                     "--tracking-uri", tracking, TOPOCAM_CACHE_DIR=str(tmp_path / "cache-third"))
    (out,) = finish([w])
    assert w.returncode == 0 and "model of damaged: fetched" in out, out


@pytest.mark.slow
def test_a_tracking_server_down_when_a_worker_needs_the_model_is_one_line_within_seconds(
        caches, postgres, own_mlflow_server, tmp_path):
    url, tracking = postgres.database("serverdown"), own_mlflow_server.start()
    study = write_study(tmp_path, "serverdown")
    _prepare(study, tmp_path, tmp_path / "cache-gpu", url, tracking)
    own_mlflow_server.kill()
    t0 = time.monotonic()
    w = start_worker(caches, tmp_path, study, "--sampler", "random", "--seed", "0", "--n-trials", "2", "--storage", url,
                     "--tracking-uri", tracking, TOPOCAM_CACHE_DIR=str(tmp_path / "cache-cpu"))
    (out,) = finish([w])
    took = time.monotonic() - t0
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert w.returncode != 0 and len(lines) == 1, out
    assert tracking in lines[0] or "tracking" in lines[0], out
    assert took < 60, took  # the worker's own start (imports, data) included
    print(f"server down: exit {w.returncode} after {took:.1f} s: {lines[0]}")
    from topocam.search.storage import open_storage

    names = [s.study_name for s in optuna.get_all_study_summaries(open_storage(url), include_best_trial=False)]
    trials = trials_of(url, "serverdown.random.s0") if "serverdown.random.s0" in names else []
    assert trials == [], trials  # the budget is untouched


def test_export_of_a_trial_scored_on_another_backbone_registers_nothing(tmp_path, monkeypatch):
    """One machine, nothing published: the local checkpoint is swapped for another valid one
    (another seed's) after the search; export refuses it, naming both digests, once it is loaded."""
    import shutil
    from dataclasses import replace

    from topocam.core.pipeline import prepare
    from topocam.deploy.export import export
    from topocam.search.studyfile import load_study
    from topocam.tracking import Tracker

    monkeypatch.setenv("TOPOCAM_OFFLINE", "1")
    monkeypatch.setenv("TOPOCAM_CACHE_DIR", str(tmp_path / "cache"))
    study = write_study(tmp_path, "swapped")
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    worker = _runner(study, storage, tracking, tmp_path, [])
    worker.run("random", 0, 2)
    spec = load_study(study)
    seen = worker.ctx.backbone.cache_key
    (t0,) = [t for t in optuna.load_study(study_name="swapped.random.s0", storage=storage).trials if t.number == 0]
    other = prepare(replace(spec.base, seed=7), progress=False, data=worker.ctx.data)
    cache = tmp_path / "cache" / "backbones"
    shutil.copyfile(cache / f"{other.backbone.cache_key}.pt", cache / f"{seen}.pt")
    with pytest.raises(TopoCAMError, match="nothing was registered") as exc:
        export(spec, "swapped-model", storage, Tracker(tracking, tmp_path), trial=0, progress=False, log=lambda m: None)
    assert t0.user_attrs["backbone_sha256"][:16] in str(exc.value)
    assert entry_digest(cache / f"{seen}.pt")[0][:16] in str(exc.value)
    from mlflow import MlflowClient

    assert MlflowClient(tracking).search_registered_models() == []
