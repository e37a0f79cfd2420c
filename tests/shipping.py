"""Helpers for the shipping tests (export, serving, predict, the web page).

One tiny study (synthetic 2D lesions, 16 px, a 2-epoch small CNN, 8 Betti
bins) is searched by two samplers on two seeds and exported once, as the
registered model ``tiny-topocam``, into a real SQLite MLflow store; the
``shipped`` fixture (conftest.py) shares it across the tests of a session.
Subprocesses (the model server, the CLI, the app, a fresh Python) get an
environment in which ``topocam`` imports from this repository.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-topocam"
TINY_STUDY = """\
[study]
name = "shiptiny"
objective = "val_auc"
n_trials = 3
samplers = ["random", "tpe"]
seeds = [0, 1]

[data]
dataset = "synthetic2d"
size = 16
synthetic_n = [40, 16, 16]

[backbone]
backbone = "small"
epochs = 2
batch_size = 16
seed = 0

[fixed]
bins = 8
n_jobs = 1
outside = "exclude"

[space.tau]
low = 0.7
high = 0.9
[space.cam]
choices = ["gradcam", "gradcampp"]
[space.mlp_h1]
low = 4
high = 16
[space.mlp_h2]
low = 4
high = 8
"""
RUNS = (("random", 0), ("tpe", 1))  # two samplers on two seeds: different trials to choose from


@dataclass
class Shipped:
    root: Path
    runs: Path
    study_file: Path
    storage: str
    tracking_uri: str
    cache: Path
    spec: object
    result: object  # topocam.deploy.export.ExportResult
    data: object  # the synthetic Dataset the study used

    @property
    def uri(self) -> str:
        return f"models:/{MODEL}@champion"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for subprocesses: topocam from this repo, this store and cache, offline."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
        env.update(MLFLOW_TRACKING_URI=self.tracking_uri, TOPOCAM_CACHE_DIR=str(self.cache), TOPOCAM_OFFLINE="1",
                   MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        env.update(extra)
        return env

    def uint8(self, split: str) -> np.ndarray:
        """A split's images as 8-bit (N, H, W): what a PNG of them holds."""
        return np.round(self.data.x[split][:, 0] * 255).astype(np.uint8)


def make_shipped(root: Path) -> Shipped:
    from topocam.core.data import load_dataset
    from topocam.deploy.export import export
    from topocam.search.runner import StudyRunner
    from topocam.search.storage import default_storage
    from topocam.search.studyfile import load_study
    from topocam.tracking import Tracker

    runs = root / "mlruns"
    runs.mkdir(parents=True)
    study_file = root / "shiptiny.toml"
    study_file.write_text(TINY_STUDY)
    spec = load_study(study_file)
    storage = default_storage(runs)
    tracker = Tracker(None, runs)
    runner = StudyRunner(spec, storage, tracker, progress=False, runs_dir=runs, log=lambda m: None)
    for sampler, seed in RUNS:
        runner.run(sampler, seed, 3)
    result = export(spec, MODEL, storage, tracker, progress=False, log=lambda m: None)
    b = spec.base
    data = load_dataset(b.dataset, size=b.size, synthetic_n=b.synthetic_n, seed=b.seed)
    return Shipped(root, runs, study_file, storage, tracker.uri, Path(os.environ["TOPOCAM_CACHE_DIR"]), spec, result, data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, ctype: str = "application/json", timeout: float = 120):
    """(status, body text) of one request; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": ctype} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str], ready_url: str, log: Path, startup_s: float = 240):
    """Start a server process (its own process group), wait until ``ready_url``
    answers 200, yield it, then stop the group. A server that exits or never
    answers fails with its log."""
    fh = open(log, "wb")
    proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if http("GET", ready_url, timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready after {startup_s:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        stop_group(proc)
        fh.close()


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a server started with ``start_new_session=True`` and its children: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cli(*args: str, env: dict[str, str], timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
