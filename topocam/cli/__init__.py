"""topocam: the command-line interface (thin: parse, call topocam, print), one module
per command group; the app and the shared options live in :mod:`.common`."""

from __future__ import annotations

import sys

import typer
from rich.text import Text

from .common import app, console, err


def _version(value: bool) -> None:
    if value:
        from topocam import __version__

        console.print(f"topocam {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """TopoCAM: Betti curves of CAM-selected regions, studies and baselines."""


from . import ablate as _ablate  # noqa: E402,F401
from . import deploy as _deploy  # noqa: E402,F401
from . import run as _run  # noqa: E402,F401  (registers `topocam run`; the order is --help's)
from . import study as _study  # noqa: E402,F401


def _stop(signum: int, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (a scheduler, `kill`) stops a worker as Ctrl-C does


def _show_warning(python_show, message, category, filename, lineno, file=None, line=None) -> None:
    """A store or cache entry found damaged and set aside, or an old study-file key, is said in
    one line, not Python's two."""
    from topocam.core.errors import CorruptCacheWarning, DamagedStoreWarning, DeprecatedKeyWarning

    if issubclass(category, (CorruptCacheWarning, DamagedStoreWarning, DeprecatedKeyWarning)):
        err.print(Text.assemble(("warning:", "bold yellow"), f" {message}"), highlight=False, soft_wrap=True)
    else:
        python_show(message, category, filename, lineno, file, line)


def main() -> None:
    import functools
    import signal
    import warnings

    warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
    signal.signal(signal.SIGTERM, _stop)
    # A process started in the background by a script (`worker &`, nohup) or by a parent that
    # ignores SIGINT inherits SIG_IGN, and Python then never raises KeyboardInterrupt: `kill -INT`
    # would be ignored and the worker never stopped cleanly. Ctrl-C means stop, wherever we run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
