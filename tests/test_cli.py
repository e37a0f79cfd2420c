import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app

from .conftest import medmnist_file

runner = CliRunner()
FAST = ["--size", "20", "--synthetic-n", "40,16,16", "--backbone", "small", "--epochs", "3", "--batch-size", "16",
        "--bins", "8", "--mlp", "16,8", "--quiet"]


def _run(args, tmp_path):
    return runner.invoke(app, ["run", *args, "--cache-dir", str(tmp_path / "cache")])


def test_run_synthetic_writes_metrics_json(tmp_path):
    out = tmp_path / "out"
    r = _run(["--dataset", "synthetic2d", *FAST, "--out", str(out)], tmp_path)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    for part in (m, m["baselines"]["cnn"], m["baselines"]["topo_original"]):
        for split in ("val", "test"):
            assert set(part[split]) >= {"auc", "acc", "sensitivity", "specificity", "f1"}
    assert set(m["timings_s"]) >= {"backbone", "cams", "features", "classifier"}
    assert m["config"]["cam_target"] == "predicted" and m["n_features"] == 2 * 8 + 1
    assert "TopoCAM" in r.output and "Topo-Original" in r.output
    assert not [p for p in out.iterdir() if p.name != "metrics.json"]  # no temp files left


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "nosuchset"], "unknown dataset"),
        (["--dataset", "synthetic2d", "--backbone", "vgg"], "unknown backbone"),
        (["--dataset", "synthetic2d", "--cam", "layercam"], "unknown CAM variant"),
        (["--dataset", "synthetic2d", "--weights", "0.5,-1,0.2"], "non-negative"),
        (["--dataset", "synthetic2d", "--weights", "0,0,0"], "all zero"),
        (["--dataset", "synthetic2d", "--weights", "a,b,c"], "comma-separated numbers"),
        (["--dataset", "synthetic2d", "--tau", "1.5"], "tau must lie in"),
        (["--dataset", "synthetic2d", "--outside", "inside"], "outside mode"),
        (["--dataset", "synthetic2d", "--backbone", "r3d18"], "r3d18 is 3D"),
        (["--dataset", "missing/file.npz"], "does not exist"),
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


def test_console_script_entry_point(tmp_path):
    exe = Path(sys.executable).with_name("topocam")
    if not exe.exists():
        pytest.skip("topocam console script not installed in this environment")
    r = subprocess.run([str(exe), "run", "--dataset", "synthetic2d", "--tau", "7", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "tau must lie in [0, 1]" in r.stderr


def test_breastmnist_real_data_smoke(tmp_path):
    path = medmnist_file("breastmnist.npz")
    out = tmp_path / "breast"
    r = _run(["--dataset", "breastmnist", "--data-dir", str(path.parent), "--backbone", "small", "--epochs", "2",
              "--bins", "10", "--mlp", "32,16", "--quiet", "--out", str(out)], tmp_path)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"]["n"] == {"train": 546, "val": 78, "test": 156}
    assert 0.5 < m["val"]["auc"] <= 1.0 and np.isfinite(m["test"]["auc"])
