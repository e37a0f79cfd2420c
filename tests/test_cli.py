import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from topocam.cli import app

from .conftest import medmnist_file

runner = CliRunner()
FAST = ["--size", "20", "--synthetic-n", "40,16,16", "--backbone", "small", "--epochs", "3", "--batch-size", "16",
        "--bins", "8", "--mlp", "16,8", "--quiet"]


def _run(args, tmp_path):
    return runner.invoke(app, ["run", *args, "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "mlruns")])


def _mlflow_runs(tmp_path):
    """Every run in the test's store (a client of its own: mlflow.set_tracking_uri would also
    set MLFLOW_TRACKING_URI for the process, which the CLI honours)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_run_synthetic_over_seeds_writes_metrics_json_and_mlflow(tmp_path):
    out = tmp_path / "out"
    r = _run(["--dataset", "synthetic2d", *FAST, "--seeds", "0,1", "--out", str(out)], tmp_path)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["seeds"] == [0, 1] and [run["seed"] for run in m["runs"]] == [0, 1]
    for run in m["runs"]:
        for method in ("topocam", "cnn", "topo_original"):
            for split in ("val", "test"):
                assert set(run["metrics"][method][split]) >= {"auc", "acc", "sensitivity", "specificity", "f1"}
        assert set(run["timings_s"]) >= {"backbone", "cams", "features", "classifier"}
        assert set(run["backbone"]["predicted_counts"]) == {"train", "val", "test"}
        assert sum(run["backbone"]["predicted_counts"]["val"]) == 16
        assert run["n_features"] == 2 * 8 + 1
    a0, a1 = (run["metrics"]["topocam"]["test"]["auc"] for run in m["runs"])
    cell = m["summary"]["topocam"]["test"]["auc"]
    assert cell["mean"] == pytest.approx((a0 + a1) / 2) and cell["sd"] == pytest.approx(abs(a0 - a1) / np.sqrt(2))
    for method in ("topocam", "cnn", "topo_original"):
        for split in ("val", "test"):
            for metric in ("auc", "acc"):
                lo, hi = m["summary"][method][split][metric]["ci95"]
                assert 0 <= lo <= hi <= 1
    assert m["config"]["cam_target"] == "predicted"
    assert "TopoCAM" in r.output and "Topo-Original" in r.output and "±" in r.output
    assert not [p for p in out.iterdir() if p.name != "metrics.json"]  # no temp files left
    runs = _mlflow_runs(tmp_path)
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and sorted(x.data.tags["seed"] for x in children) == ["0", "1"]
    # what the numbers' bits depend on besides the seed, in metrics.json and the MLflow params (issue 20)
    import torch

    repro = m["reproducibility"]
    assert repro["torch"] == torch.__version__ and repro["device"] in ("cpu", "cuda") and repro["threads"] >= 1
    assert set(repro) == {"torch", "cuda", "device", "threads", "deterministic"} and isinstance(repro["deterministic"], bool)
    assert {k: parents[0].data.params[f"repro_{k}"] for k in repro} == {k: str(v) for k, v in repro.items()}
    assert all(x.data.tags["kind"] == "run" and x.data.tags["leakage_audit"] == "false" for x in runs)
    assert parents[0].data.metrics["topocam_test_auc_mean"] == pytest.approx(cell["mean"])
    assert children[0].data.metrics["cnn_pred_val_class0"] + children[0].data.metrics["cnn_pred_val_class1"] == 16


def test_degenerate_backbone_is_reported_loudly(tmp_path, monkeypatch):
    """A backbone that predicts one class is never used silently: a warning in the run output,
    a flag in metrics.json, a tag in MLflow."""
    import topocam.core.pipeline as pipeline

    monkeypatch.setattr(pipeline, "cnn_probabilities", lambda model, info, ds, cache_dir: {
        s: np.tile(np.float32([0.9, 0.1]), (len(ds.y[s]), 1)) for s in ds.y
    })
    out = tmp_path / "out"
    r = _run(["--dataset", "synthetic2d", *FAST, "--out", str(out)], tmp_path)
    assert r.exit_code == 0, r.output
    assert "DEGENERATE BACKBONE" in r.output and "predicts class 0 for all 16 validation images" in r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["runs"][0]["backbone"]["degenerate"] and m["summary"]["degenerate_backbones"] == [0]
    assert {x.data.tags["degenerate_backbone"] for x in _mlflow_runs(tmp_path)} == {"true"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "nosuchset"], "unknown dataset"),
        (["--dataset", "synthetic2d", "--backbone", "vgg"], "'vgg' is not one of 'auto', 'resnet18', 'r3d18', 'small'"),
        (["--dataset", "synthetic2d", "--cam", "xgradcam"], "'xgradcam' is not one of 'gradcam', 'gradcampp', 'scorecam', 'layercam', 'eigencam'"),
        (["--dataset", "synthetic2d", "--preset", "fast"], "'fast' is not one of 'medmnist_v2'"),
        (["--dataset", "synthetic2d", "--betti-backend", "gudhi"], "'gudhi' is not one of 'fast', 'giotto'"),
        (["--dataset", "synthetic2d", "--n-jobs", "0"], "--n-jobs must be -1 (all cores) or a number of threads >= 1, got 0"),
        (["--dataset", "synthetic2d", "--n-jobs", "-2"], "--n-jobs must be -1 (all cores) or a number of threads >= 1, got -2"),
        (["--dataset", "synthetic2d", "--weights", "0.5,-1,0.2"], "non-negative"),
        (["--dataset", "synthetic2d", "--weights", "0,0,0"], "all zero"),
        (["--dataset", "synthetic2d", "--weights", "a,b,c"], "comma-separated numbers"),
        (["--dataset", "synthetic2d", "--tau", "1.5"], "tau must be in [0, 1]"),
        (["--dataset", "synthetic2d", "--outside", "inside"], "'inside' is not one of 'zero', 'exclude'"),
        (["--dataset", "synthetic2d", "--backbone", "r3d18"], "r3d18 is 3D"),
        (["--dataset", "missing/file.npz"], "does not exist"),
        (["--dataset", "synthetic2d", "--seeds", "0,-1"], "--seeds needs one or more integers >= 0"),
        (["--dataset", "synthetic2d", "--clutter", "0"], "clutter"),
        (["--dataset", "synthetic2d", "--tracking-uri", "nosuchscheme://x"], "cannot open the MLflow tracking store"),
    ],
)
def test_bad_input_is_one_line_and_nonzero_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    r = _run([*FAST, *args, "--out", str(out)], tmp_path)
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output
    assert not (out / "metrics.json").exists()


def test_corrupt_npz_and_unwritable_out(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    r = _run(["--dataset", str(bad), *FAST, "--out", str(tmp_path / "o")], tmp_path)
    assert r.exit_code != 0 and "cannot read as .npz" in r.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _run(["--dataset", "synthetic2d", *FAST, "--out", str(blocker / "sub")], tmp_path)
    assert r.exit_code != 0 and "cannot write to output folder" in r.output


def test_leakage_audit_is_labelled(tmp_path):
    out = tmp_path / "audit"
    r = _run(["--dataset", "synthetic2d", *FAST, "--leakage-audit", "--out", str(out)], tmp_path)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["cam_target"] == "label" and "leak" in m["leakage_audit"]
    one = m["summary"]["topocam"]["test"]["auc"]  # one seed: the same layout, sd 0
    assert one["n"] == 1 and one["sd"] == 0.0 and one["mean"] == m["runs"][0]["metrics"]["topocam"]["test"]["auc"]
    assert {x.data.tags["leakage_audit"] for x in _mlflow_runs(tmp_path)} == {"true"}


def test_console_script_entry_point(tmp_path):
    exe = Path(sys.executable).with_name("topocam")
    if not exe.exists():
        pytest.skip("topocam console script not installed in this environment")
    r = subprocess.run([str(exe), "run", "--dataset", "synthetic2d", "--tau", "7", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "tau must be in [0, 1], got 7.0" in r.stderr


def test_breastmnist_real_data_smoke(tmp_path):
    path = medmnist_file("breastmnist.npz")
    out = tmp_path / "breast"
    r = _run(["--dataset", "breastmnist", "--data-dir", str(path.parent), "--backbone", "small", "--epochs", "2",
              "--bins", "10", "--mlp", "32,16", "--quiet", "--out", str(out)], tmp_path)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"]["n"] == {"train": 546, "val": 78, "test": 156}
    topocam = m["runs"][0]["metrics"]["topocam"]
    assert 0.5 < topocam["val"]["auc"] <= 1.0 and np.isfinite(topocam["test"]["auc"])


def test_version_module_entry_and_tracking_uri_from_the_environment(tmp_path, monkeypatch):
    from importlib.metadata import version

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"topocam {version('topocam')}"
    m = subprocess.run([sys.executable, "-m", "topocam", "--version"], capture_output=True, text=True, timeout=120)
    assert m.returncode == 0 and m.stdout.strip() == r.output.strip()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://x")
    bad = _run(["--dataset", "synthetic2d", *FAST, "--out", str(tmp_path / "o")], tmp_path)
    assert bad.exit_code != 0 and "nosuchscheme://x" in bad.output


def test_error_text_in_square_brackets_is_kept(tmp_path):
    """Rich markup used to swallow '[space.cam]' and similar from every message."""
    study = tmp_path / "s.toml"
    study.write_text('[study]\nname = "s"\n[space.cam]\nchoices = ["nope"]\n')
    r = runner.invoke(app, ["study", "run", str(study), "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code != 0 and "[space.cam] choices ['nope']" in r.output


def test_help_shows_choices_and_bracketed_text_and_completion():
    """Choice options list their values; help text is not read as markup (so
    "[default: 10, or the preset's]" and "'.[giotto]'" survive); completion is on."""
    r = runner.invoke(app, ["run", "--help"], terminal_width=200)
    assert r.exit_code == 0
    for choices in ("gradcam|gradcampp|scorecam", "zero|exclude", "fast|giotto", "auto|resnet18|r3d18|small", "medmnist_v2"):
        assert choices in r.output, choices
    assert "[default: 10, or the preset's]" in r.output and "'.[giotto]'" in r.output
    study = runner.invoke(app, ["study", "run", "--help"], terminal_width=200)
    assert "de|de_immediate|tpe|cmaes|random|gp" in study.output and "topocam|topo_original" in study.output
    assert "--install-completion" in runner.invoke(app, ["--help"]).output


@pytest.mark.parametrize("argv, message", [
    (["study", "run", "STUDY", "--sampler", "bogus"], "'bogus' is not one of 'de', 'de_immediate'"),
    (["study", "run", "STUDY", "--arm", "cnn"], "'cnn' is not one of 'topocam', 'topo_original'"),
    (["study", "compare", "STUDY", "--samplers", "de,bogus"], "unknown sampler(s) ['bogus']"),
    (["study", "run", "STUDY", "--n-trials", "0"], "Invalid value for '--n-trials'"),
    (["study", "compare", "STUDY", "--seeds", "0"], "Invalid value for '--seeds'"),
])
def test_study_choices_fail_at_parse_time_before_any_store(tmp_path, argv, message):
    study = Path(__file__).resolve().parents[1] / "studies" / "quickstart.toml"
    runs = tmp_path / "runs"
    r = runner.invoke(app, [str(study) if a == "STUDY" else a for a in argv] + ["--runs-dir", str(runs)])
    assert r.exit_code == 2 and message in r.output
    assert not runs.exists()  # nothing opened: no optuna.db, no mlflow.db


def _nothing_created(tmp_path, *keep):
    made = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.name not in keep)
    assert made == [], made


@pytest.mark.parametrize("args, env, message", [
    (["--size", "100000"], {}, "size 100000 is out of range for synthetic2d: synthetic images need 12 <= size <= 1024"),
    ([], {"TOPOCAM_ROI_CACHE_MB": "abc"}, "TOPOCAM_ROI_CACHE_MB must be a number of MiB >= 0"),
    ([], {"TOPOCAM_ROI_CACHE_MB": "-5"}, "got '-5'"),
    (["--cache-dir", "{file}"], {}, "is a file; choose another --cache-dir"),
    (["--cache-dir", "{file}/sub"], {}, "which is a file; choose another --cache-dir"),
])
def test_environment_and_size_mistakes_are_one_sentence_before_anything_is_created(tmp_path, monkeypatch, args, env, message):
    """No traceback (was: MemoryError, ValueError from float('abc'), NotADirectoryError
    after the backbone trained), and no output folder, MLflow store or cache left behind."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    argv = ["run", "--dataset", "synthetic2d", *FAST, "--out", str(out), "--runs-dir", str(tmp_path / "mlruns")]
    if "--cache-dir" not in args:
        argv += ["--cache-dir", str(tmp_path / "cache")]
    r = runner.invoke(app, argv + [a.format(file=blocker) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output
    _nothing_created(tmp_path, "afile")


def test_a_failed_run_leaves_no_output_folder(tmp_path):
    """The output folder (and missing parents) made for a run that then fails
    are removed; an existing folder is kept."""
    out = tmp_path / "a" / "b" / "out"
    r = _run(["--dataset", str(tmp_path / "missing.npz"), *FAST, "--out", str(out), "--no-tracking"], tmp_path)
    assert r.exit_code != 0 and "does not exist" in r.output
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    r = _run(["--dataset", str(tmp_path / "missing.npz"), *FAST, "--out", str(kept / "new"), "--no-tracking"], tmp_path)
    assert r.exit_code != 0 and kept.is_dir() and not (kept / "new").exists()


@pytest.mark.parametrize("data, message", [
    ('dataset = "synthetic2d"\nsize = 5000', "size 5000 is out of range for synthetic2d"),
    ('dataset = "breastmnist"\nsize = 100', "size 100 is not a MedMNIST size"),
])
def test_study_data_size_is_checked_before_any_store(tmp_path, data, message):
    study = tmp_path / "s.toml"
    study.write_text(f'[study]\nname = "s"\nsamplers = ["random"]\n[data]\n{data}\n')
    runs = tmp_path / "runs"
    r = runner.invoke(app, ["study", "run", str(study), "--runs-dir", str(runs)])
    assert r.exit_code == 2 and message in r.output and str(study) in r.output, r.output
    assert not runs.exists()
