"""MLflow tracking: naming, run structure, tags, artifacts.

Structure of one study in MLflow (one experiment per study):

* ``kind=baseline``: the CNN and Topo-Original baselines, once per study;
* ``kind=sampler``: a parent run per (sampler, seed), with its artifacts
  (study file, optimisation history, parallel-coordinate and importance plots);
* ``kind=trial``: a nested run per trial: parameters, validation metrics, duration;
* ``kind=best``: nested under its sampler run, the best trial's test metrics;
* ``kind=comparison``: the sampler comparison table and plot.

Every run carries the tags ``study``, ``dataset``, ``kind`` and, where they
apply, ``sampler`` and ``seed``, so runs can be filtered in the UI.

Default store: SQLite under the runs folder (``mlruns/mlflow.db``) with
artifacts beside it (``mlruns/artifacts``). All calls go through
``MlflowClient`` with explicit run ids: no global active run, so trials from
several threads or workers cannot cross wires.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from .errors import TopoCAMError

DEFAULT_RUNS_DIR = Path("mlruns")


def default_tracking_uri(runs_dir: Path) -> str:
    return f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


class Tracker:
    def __init__(self, tracking_uri: str | None, runs_dir: Path = DEFAULT_RUNS_DIR):
        # fail within seconds on an unreachable server instead of retrying for minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow import MlflowClient

        self.runs_dir = Path(runs_dir).resolve()
        if tracking_uri is None:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            tracking_uri = default_tracking_uri(self.runs_dir)
        self.uri = tracking_uri
        try:
            self.client = MlflowClient(tracking_uri)
            self.client.search_experiments(max_results=1)
        except Exception as exc:  # mlflow raises many types for a bad URI; all mean "cannot track here"
            msg = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise TopoCAMError(
                f"cannot open the MLflow tracking store {tracking_uri!r} ({msg}); check --tracking-uri "
                f"(e.g. http://host:5000 for a server, or leave it out for the local {self.runs_dir}/mlflow.db)"
            ) from None

    # -- experiments and runs -------------------------------------------------
    def experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifacts = None
        if self.uri.startswith("sqlite:") or self.uri.startswith("file:"):
            artifacts = (self.runs_dir / "artifacts" / name).as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except Exception:  # created concurrently by another worker: use theirs
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def find_run(self, experiment_id: str, tags: dict[str, Any]) -> str | None:
        flt = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([experiment_id], filter_string=flt, max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def start_run(
        self, experiment_id: str, name: str, tags: dict[str, Any], parent: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> str:
        all_tags = {k: str(v) for k, v in tags.items()}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(experiment_id, run_name=name, tags=all_tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and not math.isnan(float(v))]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)


def flat_metrics(prefix: str, metrics: dict[str, float] | None) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in (metrics or {}).items()}
