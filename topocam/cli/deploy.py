"""``topocam export | serve | predict | app``: shipping the chosen model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from topocam.search.samplers import SamplerChoice

from .common import (
    DATA_DIR_OPTION, DEVICE_OPTION, MODEL_DEVICE_OPTION, QUIET_OPTION, RUNS_DIR_OPTION, STORAGE_OPTION, TRACKING_URI_OPTION, _checked_study, _fmt, _study_storage, _value, app, console, err, fail, make_runs_dir, output_dir,
)

# ------------------------------------------------------------------ shipping

MODEL_HELP = "model URI: models:/NAME@champion, models:/NAME/VERSION, runs:/RUN/model or a local model folder"


def _registry(tracking_uri: str | None, runs_dir: Path) -> str | None:
    """The store models:/ URIs resolve in; None when there is none (nothing is created)."""
    from topocam.tracking import resolve_tracking_uri

    return resolve_tracking_uri(tracking_uri, runs_dir, must_exist=True)


def _model_device(device: str) -> None:
    """Check ``--device`` here (a GPU asked for where there is none: one line) and hand it to the
    model loader, in this process and in the server's, through TOPOCAM_DEVICE."""
    import os

    from topocam.core.backbone import DEVICE_ENV, resolve_device

    resolve_device(device)
    os.environ[DEVICE_ENV] = device


def _load_model(model: str, tracking_uri: Optional[str], runs_dir: Path):
    from topocam.deploy.serve import load_model

    return load_model(model, _registry(tracking_uri, runs_dir))


@app.command("export")
def export_cmd(
    study_file: Path = typer.Argument(..., help="study definition (TOML) whose trials to export from"),
    name: str = typer.Option(..., "--name", help="registered model name; each export adds a version and moves the alias 'champion' to it"),
    sampler: Optional[SamplerChoice] = typer.Option(None, help="only this sampler's trials (default: all samplers)"),
    seed: Optional[int] = typer.Option(None, help="only this sampler seed's trials (default: all seeds)"),
    trial: Optional[int] = typer.Option(None, help="export this trial number instead of the best (needs one sampler and seed)"),
    storage: Optional[str] = STORAGE_OPTION,
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    data_dir: Optional[Path] = DATA_DIR_OPTION,
    runs_dir: Path = RUNS_DIR_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    quiet: bool = QUIET_OPTION,
):
    """Export the best trial of a study as a registered MLflow model (alias 'champion')."""
    import os

    from topocam import TopoCAMError

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        from topocam.deploy.export import check_model_name, export
        from topocam.search.choose import choose_trial
        from topocam.tracking import Tracker

        check_model_name(name)
        sampler = _value(sampler)
        # the study file and its data, then the trial looked up read-only (a storage that is not there is an
        # error, never made), and only then the MLflow store it is registered in
        spec, data = _checked_study(study_file, data_dir, device)
        storage_url = _study_storage(storage, runs_dir)
        choice = choose_trial(spec, storage_url, sampler, seed, trial)
        if tracking_uri is None:
            make_runs_dir(runs_dir)
        tracker = Tracker(tracking_uri, runs_dir)
        res = export(spec, name, storage_url, tracker, sampler, seed, trial, progress=not quiet,
                     log=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True), choice=choice, data=data)
    except TopoCAMError as exc:
        fail(str(exc))
    m = spec.metric.upper()
    c = res.choice
    lines = [
        f"registered {res.name} version {res.version} (alias champion) from {c.optuna_study} trial {c.trial}",
        f"validation {m} {_fmt(res.val.get(spec.metric))}, test {m} {_fmt(res.test.get(spec.metric))} (test: provenance only)",
        f"model: {res.alias_uri} = {res.model_uri}; run {res.run_id}; tracking {res.tracking_uri}",
        f"serve: topocam serve --model {res.alias_uri} --runs-dir {runs_dir}" if tracking_uri is None else
        f"serve: MLFLOW_TRACKING_URI={tracking_uri} topocam serve --model {res.alias_uri}",
    ]
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command("serve")
def serve_cmd(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    port: int = typer.Option(5000, help="port on --host"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (default loopback only)"),
    workers: int = typer.Option(1, help="uvicorn worker processes"),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    runs_dir: Path = RUNS_DIR_OPTION,
    device: str = MODEL_DEVICE_OPTION,
):
    """`mlflow models serve --env-manager local` for a model, working without an activated venv."""
    import os

    from topocam import TopoCAMError
    from topocam.deploy.serve import check_port_free, serve_command

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = _registry(tracking_uri, runs_dir)
    try:
        if workers < 1:
            raise TopoCAMError("--workers must be >= 1")
        _model_device(device)
        check_port_free(host, port)
        _check_model_exists(model, uri)
    except TopoCAMError as exc:
        fail(str(exc))
    argv, env = serve_command(model, host, port, uri, workers)  # the server's model loader reads TOPOCAM_DEVICE
    err.print(f"serving {model} on http://{host}:{port}/invocations (POST JSON {{\"inputs\": [image, ...]}}); Ctrl-C stops",
              markup=False, highlight=False, soft_wrap=True)
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


def _check_model_exists(model: str, tracking_uri: Optional[str]) -> None:
    """A quick, one-line failure for a model URI that does not resolve (reads MLmodel only)."""
    import mlflow

    from topocam import TopoCAMError
    from topocam.deploy.serve import check_registry

    check_registry(model, tracking_uri)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)  # the registry follows it
    try:
        mlflow.models.get_model_info(model)
    except Exception as exc:  # MlflowException / OSError: the URI does not name a model here
        msg = (str(getattr(exc, "message", "") or exc).splitlines() or [type(exc).__name__])[0][:300]
        where = f" in {tracking_uri}" if tracking_uri and model.startswith("models:/") else ""
        raise TopoCAMError(f"cannot find model {model!r}{where}: {msg}") from None


@app.command("predict")
def predict_cmd(
    # readable=False: Typer's default refuses the whole command for one unreadable file; each
    # file's problem (missing, unreadable, not an image) is that file's error in predictions.jsonl
    files: list[Path] = typer.Argument(..., readable=False,
                                       help="image files and/or folders (2D: .png .jpg .jpeg .npy; 3D: .npy .nii .nii.gz)"),
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", help="folder for predictions.jsonl and overlays/"),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    runs_dir: Path = RUNS_DIR_OPTION,
    device: str = MODEL_DEVICE_OPTION,
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
):
    """Apply an exported model to image files: predictions.jsonl and a CAM/ROI overlay per file."""
    from topocam import TopoCAMError
    from topocam.deploy.predict import predict_files

    try:
        _model_device(device)
        with output_dir(out):
            _, m = _load_model(model, tracking_uri, runs_dir)
            summary = predict_files(m, files, out, progress=not quiet)
    except TopoCAMError as exc:
        fail(str(exc))
    for r in summary.records:
        if "error" in r:
            err.print(f"{r['file']}: error: {r['error']}", markup=False, highlight=False, soft_wrap=True)
    n, bad = len(summary.records), summary.n_failed
    for r in [r for r in summary.records if "error" not in r][:20]:
        console.print(f"{r['file']}: {r['class_name']} (p = {r['probabilities'][r['class']]:.3f}), "
                      f"ROI {r['roi_fraction']:.1%}", markup=False, highlight=False)
    if n - bad > 20:
        console.print(f"... and {n - bad - 20} more", markup=False)
    console.print(f"{n - bad} of {n} file(s) predicted; wrote {summary.jsonl} and {summary.overlays}/", markup=False,
                  highlight=False, soft_wrap=True)
    if bad:
        raise typer.Exit(1)


@app.command("app")
def app_cmd(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    port: int = typer.Option(8000, help="port on --host"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (default loopback only)"),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    runs_dir: Path = RUNS_DIR_OPTION,
    device: str = MODEL_DEVICE_OPTION,
):
    """A web page over a model: upload an image, see class, probabilities, CAM, ROI and provenance."""
    from topocam import TopoCAMError
    from topocam.deploy.app import run_app
    from topocam.deploy.serve import check_port_free

    try:
        _model_device(device)
        check_port_free(host, port)
        _, m = _load_model(model, tracking_uri, runs_dir)
    except TopoCAMError as exc:
        fail(str(exc))
    err.print(f"TopoCAM page for {model}: http://{host}:{port}/ (Ctrl-C stops)", markup=False, highlight=False, soft_wrap=True)
    run_app(m, model, host, port)

