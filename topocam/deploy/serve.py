"""Model URIs, the tracking store they resolve against, and ``mlflow models serve``.

A ``models:/NAME@champion`` URI is looked up in a model registry: the tracking
store of :func:`topocam.tracking.resolve_tracking_uri` (``--tracking-uri``, else
``$MLFLOW_TRACKING_URI``, else the local store ``RUNS_DIR/mlflow.db`` if it
exists), where ``topocam export`` registers. Local paths and ``runs:/`` URIs
work too.

``mlflow models serve`` starts its HTTP server by running ``uvicorn`` through
the shell, so it fails with "uvicorn: command not found" when the virtual
environment's ``bin`` folder is not on ``PATH`` (a venv used without
activating it). :func:`serve_command` puts the running interpreter's ``bin``
first on ``PATH`` and runs ``python -m mlflow models serve --env-manager local``
with this interpreter, so the server always uses this environment.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from ..core.errors import TopoCAMError


def check_registry(uri: str, tracking_uri: str | None) -> None:
    """A registry URI needs a registry: refuse rather than let MLflow create ./mlflow.db."""
    if uri.startswith(("models:/", "runs:/")) and not tracking_uri:
        raise TopoCAMError(
            f"{uri!r} needs an MLflow tracking store and none was found: pass --tracking-uri, set "
            "MLFLOW_TRACKING_URI, or point --runs-dir at the folder holding mlflow.db"
        )


def _where(uri: str, tracking_uri: str | None) -> str:
    return f" in {tracking_uri}" if uri.startswith("models:/") and tracking_uri else ""


def load_model(uri: str, tracking_uri: str | None):
    """(PyFuncModel, its TopoCAMModel) for a model URI, or a one-line TopoCAMError."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    from .pyfunc import TopoCAMModel

    check_registry(uri, tracking_uri)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)  # the registry follows it
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # MlflowException, OSError, ...: all mean "cannot load this model"
        msg = (str(getattr(exc, "message", "") or exc).splitlines() or [type(exc).__name__])[0][:300]
        raise TopoCAMError(f"cannot load model {uri!r}{_where(uri, tracking_uri)}: {msg}") from None
    try:
        inner = model.unwrap_python_model()
    except Exception:
        inner = None
    if not isinstance(inner, TopoCAMModel):
        raise TopoCAMError(f"{uri!r} is not a TopoCAM model (export one with `topocam export`)")
    return model, inner


def check_port_free(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise TopoCAMError(f"port must be in 1..65535, got {port}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise TopoCAMError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port") from None


def serve_command(uri: str, host: str, port: int, tracking_uri: str | None, workers: int = 1) -> tuple[list[str], dict[str, str]]:
    """argv and environment of ``mlflow models serve`` for this interpreter's environment."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir]])
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
            "-h", host, "-p", str(port), "-w", str(workers)]
    return argv, env
