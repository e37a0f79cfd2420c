"""One rule for which MLflow store, and one way to it.

* :func:`topocam.tracking.resolve_tracking_uri`: an explicit URI, else
  ``$MLFLOW_TRACKING_URI``, else SQLite under the runs folder. A ``Tracker``, serve, predict,
  app and explain resolve through it, and every command's ``--tracking-uri`` / ``--storage``
  is the one shared declaration with its environment variable, so each command gives the same
  answer (checked here by running each command with the store opening stubbed out).
* Nothing outside ``topocam/tracking`` reaches for a tracker's MLflow client, nor for another
  module's private JSON helper (read from the source with ``ast``, like test_layers.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from topocam.cli import app
from topocam.cli.common import STORAGE_OPTION, TRACKING_URI_OPTION
from topocam.tracking import TRACKING_URI_ENV, Tracker, default_tracking_uri, resolve_tracking_uri

from .shipping import REPO, TINY_STUDY, free_port

PACKAGE = REPO / "topocam"
EXPLICIT = "http://explicit.invalid:5999"
FROM_ENV = "http://from-env.invalid:5999"


# ------------------------------------------------------------------ the rule


def test_resolve_tracking_uri_explicit_then_environment_then_runs_folder(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    local = default_tracking_uri(runs)
    assert local == f"sqlite:///{runs.resolve()}/mlflow.db"
    assert resolve_tracking_uri(None, runs) == local
    assert resolve_tracking_uri(None, runs, must_exist=True) is None  # a reader makes no store
    assert not runs.exists()
    runs.mkdir()
    (runs / "mlflow.db").touch()
    assert resolve_tracking_uri(None, runs, must_exist=True) == local
    monkeypatch.setenv(TRACKING_URI_ENV, FROM_ENV)
    assert resolve_tracking_uri(None, runs) == resolve_tracking_uri(None, runs, must_exist=True) == FROM_ENV
    assert resolve_tracking_uri(EXPLICIT, runs) == resolve_tracking_uri(EXPLICIT, runs, must_exist=True) == EXPLICIT
    monkeypatch.setenv(TRACKING_URI_ENV, "")  # set but empty: not a store
    assert resolve_tracking_uri(None, runs) == local


def test_tracker_follows_the_rule(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr("topocam.tracking.tracker._open_client", lambda uri: opened.append(uri) or object())
    runs = tmp_path / "runs"
    assert Tracker(None, runs).uri == default_tracking_uri(runs) and runs.is_dir()  # the local store's folder is made
    monkeypatch.setenv(TRACKING_URI_ENV, FROM_ENV)
    other = tmp_path / "other"
    assert Tracker(None, other).uri == FROM_ENV and not other.exists()  # nothing made for a store elsewhere
    assert Tracker(EXPLICIT, other).uri == EXPLICIT
    assert opened == [default_tracking_uri(runs), FROM_ENV, EXPLICIT]


# ------------------------------------------------- the options, declared once


def _commands(group, prefix: tuple[str, ...] = ()):
    """(name, command) of every command of a group and its subgroups (Typer's own Click)."""
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield " ".join(prefix + (name,)), cmd


COMMANDS = dict(_commands(typer.main.get_command(app)))
SHARED = {"tracking_uri": (TRACKING_URI_OPTION, "MLFLOW_TRACKING_URI"), "storage": (STORAGE_OPTION, "TOPOCAM_STORAGE")}


def test_every_store_option_is_the_shared_declaration_with_its_variable():
    seen = {}
    for name, cmd in COMMANDS.items():
        for p in cmd.params:
            if p.name in SHARED:
                shared, var = SHARED[p.name]
                assert (p.envvar, p.help, p.default) == (var, shared.help, None), (name, p.name)
                assert getattr(p, "show_envvar", False), (name, p.name)  # --help names the variable
                assert "(default: sqlite RUNS_DIR/" in p.help
                seen.setdefault(p.name, set()).add(name)
    assert seen["tracking_uri"] == {"run", "study run", "study compare", "study prepare", "export", "ablate", "explain",
                                    "serve", "predict", "app", "report"}
    assert seen["storage"] == {"study run", "study compare", "study prepare", "study status", "export", "ablate",
                               "explain", "report"}


# ------------------------------------------ every command: the same answer

MODEL = "models:/nothing@champion"


def _args(command: str, tmp: Path, runs: Path) -> list[str]:
    study = tmp / "tiny.toml"
    study.write_text(TINY_STUDY)
    storage = ["--storage", f"sqlite:///{tmp / 'optuna.db'}"]
    return {
        "run": ["run", "--dataset", "synthetic2d", "--out", str(tmp / "out"), "--quiet"],
        "study run": ["study", "run", str(study), *storage, "--quiet"],
        "study compare": ["study", "compare", str(study), *storage, "--quiet"],
        "study prepare": ["study", "prepare", str(study), *storage, "--quiet"],
        "export": ["export", str(study), "--name", "m", *storage, "--quiet"],
        "ablate": ["ablate", str(study), "--suite", str(REPO / "studies" / "ablations" / "paper.toml"), *storage, "--quiet"],
        "explain": ["explain", "0123456789abcdef", "--out", str(tmp / "out"), "--quiet"],
        "serve": ["serve", "--model", MODEL, "--port", str(free_port())],
        "predict": ["predict", str(tmp / "x.png"), "--model", MODEL, "--out", str(tmp / "out")],
        "app": ["app", "--model", MODEL, "--port", str(free_port())],
    }[command] + ["--runs-dir", str(runs)]


@pytest.fixture
def no_store_opened(monkeypatch):
    """Every way a command opens an MLflow store fails at once, saying the store it was given
    (a Tracker names it in its one-line error, serve / predict / app in 'cannot ... model')."""

    import mlflow.models
    import mlflow.pyfunc  # noqa: F401  imported now: a lazy first import later would bring the real functions back

    def refuse(*a, **k):
        raise RuntimeError("not opened in this test")

    monkeypatch.setattr("topocam.tracking.tracker._open_client", refuse)
    monkeypatch.setattr("mlflow.models.get_model_info", refuse)
    monkeypatch.setattr("mlflow.pyfunc.load_model", refuse)
    monkeypatch.setattr("mlflow.set_tracking_uri", lambda uri: None)  # nor left set for the process


@pytest.mark.parametrize("case", ["explicit", "environment", "runs folder"])
# export and ablate look their trial up in the study storage first and refuse a storage with no
# study before any tracking store is opened (tests/test_readonly.py); export's tracking store from
# the flag and the environment is tested on a real study (tests/test_export.py). report, too, reads
# the study storage (read-only) before it opens a tracking store; `data import` opens no store.
@pytest.mark.parametrize("command", sorted(COMMANDS.keys() - {"study status", "export", "ablate", "report", "data import"}))
def test_each_command_resolves_the_same_store(command, case, tmp_path, no_store_opened):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "mlflow.db").touch()  # the readers (serve, predict, app, explain) use a local store only if it exists
    args = _args(command, tmp_path, runs)
    env = {TRACKING_URI_ENV: None}
    if case != "runs folder":
        env[TRACKING_URI_ENV] = FROM_ENV
    if case == "explicit":
        args += ["--tracking-uri", EXPLICIT]
    want = {"explicit": EXPLICIT, "environment": FROM_ENV, "runs folder": default_tracking_uri(runs)}[case]
    r = CliRunner().invoke(app, args, env=env)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert want in r.output, r.output
    assert "not opened in this test" in r.output, r.output  # it got as far as opening that store


# ------------------------------------------ no reaching past the wrapper


PRIVATE_JSON = ("_json_safe", "_json_default")  # JSON conversion is topocam.core.atomic.json_safe


def reach_ins(source: str) -> list[str]:
    """A tracker's MLflow client (``x.client``, ``x._client``), or another module's private JSON
    helper (imported, or read as ``module._json_safe``)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in ("client", "_client"):
            out.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_JSON:
            out.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.ImportFrom):
            out += [(node.lineno, f"import {a.name}") for a in node.names if a.name in PRIVATE_JSON]
    return [f"line {n}: {what}" for n, what in sorted(out)]


def test_nothing_outside_tracking_reaches_for_the_client_or_a_private_json_helper():
    files = [f for f in sorted(PACKAGE.rglob("*.py")) if "tracking" not in f.relative_to(PACKAGE).parts]
    assert len(files) >= 40, "the package moved: update this test"
    bad = {str(f.relative_to(PACKAGE)): hits for f in files if (hits := reach_ins(f.read_text()))}
    assert bad == {}


def test_the_reach_in_rule_can_fail():
    src = ("def f(tracker, compare):\n    from .compare import _json_safe\n"
           "    return tracker.client.get_run(1), compare._json_default, tracker._client\n")
    assert reach_ins(src) == ["line 2: import _json_safe", "line 3: ._client", "line 3: ._json_default", "line 3: .client"]
