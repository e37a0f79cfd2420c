"""topocam: the command-line interface (thin: parse, call topocam, print), one module
per command group; the app and the shared options live in :mod:`.common`."""

from __future__ import annotations

import os
import signal
import sys

import typer
from rich.text import Text

from .common import app, console, err


def _version(value: bool) -> None:
    if value:
        from topocam import __version__

        console.print(f"topocam {__version__}", markup=False, highlight=False)
        raise typer.Exit()


_USER_MLFLOW_LEVEL = os.environ.get("MLFLOW_LOGGING_LEVEL")  # as the user set it, before we set it


def _mlflow_logging(verbose: bool) -> None:
    """MLflow's own INFO lines ("Creating initial MLflow database tables...", "Validating input
    example against model signature") are not ours to show: WARNING and above only, unless
    ``--verbose``. MLflow sets its loggers' level when it is imported (from
    MLFLOW_LOGGING_LEVEL), so the variable is set for a later import and for the processes we
    start, and the logger for an MLflow already imported. A level the user set is kept."""
    import logging

    level = (_USER_MLFLOW_LEVEL or "").upper() or "WARNING"
    if verbose and logging.getLevelName(level) not in (logging.DEBUG, logging.INFO):
        level = "INFO"
    os.environ["MLFLOW_LOGGING_LEVEL"] = level
    if isinstance(logging.getLevelName(level), int):
        logging.getLogger("mlflow").setLevel(level)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
    verbose: bool = typer.Option(False, "--verbose", help="also show MLflow's own INFO lines (store creation, model validation)"),
) -> None:
    """TopoCAM: Betti curves of CAM-selected regions, studies and baselines."""
    _mlflow_logging(verbose)


from . import ablate as _ablate  # noqa: E402,F401
from . import data as _data  # noqa: E402,F401
from . import deploy as _deploy  # noqa: E402,F401
from . import run as _run  # noqa: E402,F401  (registers `topocam run`; the order is --help's)
from . import study as _study  # noqa: E402,F401
from . import report as _report  # noqa: E402,F401


_STOPPED_BY: list[int] = []  # the signals that stopped this process (SIGINT, SIGTERM)


def _stop(signum: int, frame) -> None:
    """Ctrl-C and SIGTERM (a scheduler, `kill`) stop a worker the same way: a KeyboardInterrupt,
    so the trial under way is re-queued and its runs are closed. Which signal is remembered:
    Typer turns the interrupt into exit code 130 before :func:`main` sees it."""
    from topocam.core.errors import Terminated

    _STOPPED_BY.append(signum)
    raise Terminated("SIGTERM") if signum == signal.SIGTERM else KeyboardInterrupt


def _stopped() -> None:
    """Our one line for a stop by signal, and the shell's exit code for it (128 + the signal)."""
    signum = _STOPPED_BY[0] if _STOPPED_BY else signal.SIGINT
    err.print("terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted", markup=False, highlight=False)
    sys.exit(128 + signum)


def _show_warning(python_show, message, category, filename, lineno, file=None, line=None) -> None:
    """A store or cache entry found damaged and set aside, or a study file read other than its author
    may have meant (an old key, a [fixed] value that trials still search), is said in one line, not
    Python's two."""
    from topocam.core.errors import CorruptCacheWarning, DamagedStoreWarning, StudyFileWarning

    if issubclass(category, (CorruptCacheWarning, DamagedStoreWarning, StudyFileWarning)):
        err.print(Text.assemble(("warning:", "bold yellow"), f" {message}"), highlight=False, soft_wrap=True)
    else:
        python_show(message, category, filename, lineno, file, line)


def main() -> None:
    import functools
    import warnings

    warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
    signal.signal(signal.SIGTERM, _stop)
    # A process started in the background by a script (`worker &`, nohup) or by a parent that
    # ignores SIGINT inherits SIG_IGN, and Python then never raises KeyboardInterrupt: `kill -INT`
    # would be ignored and the worker never stopped cleanly. Ctrl-C means stop, wherever we run.
    signal.signal(signal.SIGINT, _stop)
    try:
        app()
    except KeyboardInterrupt:
        _stopped()
    except SystemExit as exc:
        if _STOPPED_BY and exc.code not in (0, None):  # Typer's exit 130 for the interrupt, or a failure it caused
            _stopped()
        raise


if __name__ == "__main__":
    main()
