"""What every command shares: the consoles, the one-line error, the options several
commands take (each declared once here), parsing helpers and the output folder."""

from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from topocam.search.samplers import SAMPLERS

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="TopoCAM: Betti curves of CAM-selected regions, studies and baselines.")
# piped output (a log, CI, `| tee`) has no terminal width: tables there keep their full width instead of 80 columns
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

RUNS_DIR_HELP = "local runs folder: default Optuna storage (optuna.db) and MLflow store (mlflow.db + artifacts/)"
# options several commands share (one declaration each); every command taking a store takes it
# through these, so the flag, then its environment variable, then the runs folder decide, as
# topocam.tracking.resolve_tracking_uri does for a Tracker and for serve / predict / app / explain
STORAGE_OPTION = typer.Option(None, envvar="TOPOCAM_STORAGE", help="Optuna storage URL (default: sqlite RUNS_DIR/optuna.db)")
TRACKING_URI_OPTION = typer.Option(
    None, envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking URI, also the model registry of models:/ URIs (default: sqlite RUNS_DIR/mlflow.db)")
DATA_DIR_OPTION = typer.Option(None, help="folder holding MedMNIST .npz files (or TOPOCAM_DATA_DIR)")
RUNS_DIR_OPTION = typer.Option(Path("mlruns"), help=RUNS_DIR_HELP)
QUIET_OPTION = typer.Option(False, "--quiet", help="no progress bars")
DEVICE_OPTION = typer.Option(
    None, "--device", help="where the backbone runs: auto (a GPU where CUDA sees one, else the CPU), cpu, cuda or cuda:N "
    "(default: the study file's [backbone] device, else auto)")
MODEL_DEVICE_OPTION = typer.Option(
    "auto", "--device", help="where the model's backbone runs: auto (a GPU where CUDA sees one, else the CPU), cpu, cuda or cuda:N")


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and a non-zero exit. The message is plain Text: Rich markup would
    swallow a study file's "[section]", "[0, 1]" or a user's path in brackets."""
    err.print(Text.assemble(("error:", "bold red"), " " + message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"{what} must be comma-separated numbers, got {text!r}")


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"{what} must be comma-separated integers, got {text!r}")


def _value(choice):
    """An Enum option's string (None stays None)."""
    return None if choice is None else choice.value


def _n_jobs_option(value: int) -> int:
    from topocam.core.errors import TopoCAMError
    from topocam.core.jobs import check_n_jobs

    try:
        return check_n_jobs(value, "--n-jobs")
    except TopoCAMError as exc:
        raise typer.BadParameter(str(exc)) from None


def _sampler_list_option(value: Optional[str]) -> Optional[str]:
    """--samplers de,tpe: every name checked at parse time."""
    if value is None:
        return None
    names = [s.strip() for s in value.split(",") if s.strip()]
    bad = [n for n in names if n not in SAMPLERS]
    if bad or not names:
        raise typer.BadParameter(f"unknown sampler(s) {bad or value!r}; choose from {', '.join(SAMPLERS)}")
    return value


def ensure_writable_dir(path: Path) -> None:
    """Fail before any work if results could not be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        fail(f"cannot write to output folder {path} ({exc.strerror or exc}); choose another --out")


OVERWRITE_HELP = "write into a non-empty output folder, replacing the files of an earlier run there (default: refuse it)"


def refuse_earlier_results(path: Path, overwrite: bool) -> None:
    """Fail before any work if ``path`` is a folder holding anything (an earlier run's results,
    which this run would replace) and ``--overwrite`` was not given."""
    if overwrite or not path.is_dir():
        return
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError:  # unreadable: ensure_writable_dir says so
        return
    if names:
        held = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        fail(f"output folder {path} is not empty (it holds {held}); pass --overwrite to replace its files, or choose another --out")


@contextmanager
def output_dir(path: Path):
    """``ensure_writable_dir(path)`` for the body; if the body fails, the folders it
    created (the output folder and any missing parents) are removed again while
    empty, so a failed command leaves no empty output folder behind."""
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    ensure_writable_dir(path)
    try:
        yield path
    except BaseException:
        for p in created:
            try:
                p.rmdir()
            except OSError:  # not empty (or gone): keep it and everything above
                break
        raise


def _fmt(v: float | None) -> str:
    return "—" if v is None or v != v else f"{v:.3f}"


def print_runs_link(tracker, experiment: str, **view) -> None:
    """Say where the runs are: the experiment and store, then the link to the runs table with the
    runs to compare and their metric columns (``Tracker.runs_table_url``'s keywords), and for a local
    store the command that serves it first."""
    name = tracker.experiment_name(experiment)
    console.print(f"MLflow: experiment {name!r} in {tracker.uri}", markup=False, highlight=False, soft_wrap=True)
    serve = tracker.ui_command()
    if serve:
        console.print(f"  serve it: {serve}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"  runs table: {tracker.runs_table_url(experiment, **view)}", markup=False, highlight=False, soft_wrap=True)


METHOD_NAMES = {"topocam": "TopoCAM", "cnn": "CNN", "topo_original": "Topo-Original"}


def make_runs_dir(runs_dir: Path) -> None:
    """The runs folder, made if missing, for the stores a command writes there (a TopoCAMError if it cannot be)."""
    from topocam import TopoCAMError

    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TopoCAMError(f"cannot create the runs folder {runs_dir} ({exc.strerror or exc}); choose another --runs-dir, "
                           "or pass --storage and --tracking-uri") from None


def _checked_study(study_file: Path, data_dir, device: Optional[str] = None):
    """The study file and its data, both checked: what a study command does before it opens or makes any store.
    ``device`` (``--device``) replaces the file's ``[backbone] device``: it is not part of the study's definition."""
    from dataclasses import replace

    import optuna

    from topocam.core.pipeline import load_checked
    from topocam.search.studyfile import load_study

    # one line per trial from Optuna's logger would bury the trial bar (trials, best, ETA);
    # every trial's parameters and metrics are in MLflow and `topocam study status`
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_study(study_file, data_dir=str(data_dir) if data_dir else None)
    if device is not None:
        from topocam.core.settings import SETTINGS

        spec = replace(spec, base=replace(spec.base, device=SETTINGS["device"].check(device)))
    return spec, load_checked(spec.base)


def _study_storage(storage: Optional[str], runs_dir: Path) -> str:
    """``--storage``, else the runs folder's optuna.db (its URL only: nothing is made)."""
    from topocam.search.storage import default_storage

    return storage if storage is not None else default_storage(runs_dir)


def _study_setup(study_file: Path, data_dir, storage, tracking_uri, runs_dir: Path, quiet: bool, device: Optional[str] = None):
    """A study's spec and a runner on its opened stores; the study file and its data are checked first,
    so bad input leaves no store behind."""
    from topocam.search.runner import StudyRunner

    spec, data = _checked_study(study_file, data_dir, device)
    if storage is None or tracking_uri is None:
        make_runs_dir(runs_dir)
    return spec, StudyRunner.open(spec, _study_storage(storage, runs_dir), tracking_uri, runs_dir, progress=not quiet, data=data)
