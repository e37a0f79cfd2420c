"""What the commands say, and what they do per file (issue 19).

* An output folder holding an earlier result is not overwritten without ``--overwrite``
  (``run``, ``study compare``, ``ablate``).
* ``predict`` takes an unreadable file (or folder) as that file's error, as it does a missing
  one, instead of refusing the whole command at parse time.
* A full disk while a checkpoint is saved, SIGTERM during a study, a folder given as a study
  file, and an unknown key in a suite's ``[suite]`` table are each said in one clear line.
* MLflow's own INFO lines stay out of the output unless ``topocam --verbose``.

Real files and real processes: an unreadable file is one whose mode is 000, read by a process
without root's power to override it (``setpriv``); a full disk is a real size limit
(RLIMIT_FSIZE) in a child process, and, where this machine lets a test mount one, a real full
filesystem (a tmpfs of 64 KiB).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from topocam.cli import app
from topocam.core.errors import TopoCAMError

from .test_cli import FAST
from .test_scale_out import REPO, env, start_slow_worker, trials_of  # noqa: F401  (env: the warm-cache fixture)
from .test_study import write_study

runner = CliRunner()


def child_env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"}
    out.update(PYTHONPATH=str(REPO), TOPOCAM_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return out


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------- 7. an earlier result is kept


def _run(tmp_path: Path, *args: str):
    return runner.invoke(app, ["run", "--dataset", "synthetic2d", *FAST, "--no-tracking",
                               "--cache-dir", str(tmp_path / "cache"), *args])


def test_run_refuses_an_output_folder_holding_an_earlier_result(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"earlier": true}\n')
    r = _run(tmp_path, "--out", str(out))
    assert r.exit_code == 2, r.output
    assert error_lines(r.output) == [
        f"error: output folder {out} is not empty (it holds metrics.json); pass --overwrite to replace its files, "
        "or choose another --out"], r.output
    assert json.loads((out / "metrics.json").read_text()) == {"earlier": True}
    assert not (tmp_path / "cache").exists(), "refused before any work"

    r = _run(tmp_path, "--out", str(out), "--overwrite")
    assert r.exit_code == 0, r.output
    assert set(json.loads((out / "metrics.json").read_text())) >= {"runs", "summary"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(tmp_path, "--out", str(empty)).exit_code == 0  # an empty folder is no earlier result


@pytest.mark.parametrize("command", ["compare", "ablate"])
def test_compare_and_ablate_refuse_an_output_folder_holding_earlier_tables(tmp_path, monkeypatch, command):
    monkeypatch.setenv("TOPOCAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TOPOCAM_OFFLINE", "1")
    study = write_study(tmp_path, "outs", study={"samplers": ["random"], "seeds": [0], "n_trials": 1})
    runs = tmp_path / "runs"
    if command == "compare":  # the folder given
        out, earlier = tmp_path / "cmp", "comparison.md"
        argv = ["study", "compare", str(study), "--samplers", "random", "--seeds", "1", "--n-trials", "1", "--out", str(out)]
    else:  # the default folder
        suite = tmp_path / "suite.toml"
        suite.write_text('[suite]\nname = "s"\n[[ablation]]\nname = "tau"\narms = [{ arm = "0.5", tau = 0.5 }]\n')
        out, earlier = runs / "ablate" / "outs-s", "ablation.md"
        argv = ["ablate", str(study), "--suite", str(suite), "--base", "file", "--seeds", "0", "--no-figures"]
    out.mkdir(parents=True)
    (out / earlier).write_text("the earlier table\n")
    r = runner.invoke(app, [*argv, "--runs-dir", str(runs), "--quiet"])
    assert r.exit_code == 2, r.output
    assert error_lines(r.output) == [
        f"error: output folder {out} is not empty (it holds {earlier}); pass --overwrite to replace its files, "
        "or choose another --out"], r.output
    assert (out / earlier).read_text() == "the earlier table\n"
    assert not (tmp_path / "cache").exists(), "refused before any work"
    if command == "ablate":
        r = runner.invoke(app, [*argv, "--runs-dir", str(runs), "--quiet", "--overwrite"])
        assert r.exit_code == 0, r.output
        assert "| tau" in (out / earlier).read_text()


# ------------------------------------------------------------ 8. predict, file by file


def _without_root_override() -> list[str]:
    """An argv prefix under which a file of mode 000 cannot be read: as root, root's power to
    read any file (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) dropped; otherwise nothing."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): no way to make a file unreadable")
    drop = "-dac_override,-dac_read_search"
    return [setpriv, "--bounding-set", drop, "--inh-caps", drop]


def test_predict_takes_an_unreadable_file_or_folder_as_that_files_error(shipped, tmp_path):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(shipped.uint8("test")[0]).save(good)
    secret, locked, missing = tmp_path / "secret.png", tmp_path / "locked", tmp_path / "missing.png"
    shutil.copy(good, secret)
    locked.mkdir()
    shutil.copy(good, locked / "inside.png")
    out = tmp_path / "out"
    prefix = _without_root_override()
    secret.chmod(0)
    locked.chmod(0)
    try:
        r = subprocess.run([*prefix, sys.executable, str(REPO / "cli.py"), "predict", str(secret), str(locked), str(missing),
                            str(good), "--model", shipped.uri, "--out", str(out), "--quiet"],
                           env=shipped.env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    finally:
        secret.chmod(0o644)
        locked.chmod(0o755)
    assert r.returncode == 1, r.stdout + r.stderr  # some files failed, the others were predicted
    assert "Invalid value" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    records = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [Path(x["file"]).name for x in records] == ["secret.png", "locked", "missing.png", "good.png"]
    by = {Path(x["file"]).name: x for x in records}
    assert by["secret.png"]["error"] == "permission denied: this file cannot be read"
    assert by["locked"]["error"] == "permission denied: this folder cannot be listed"
    assert by["missing.png"]["error"] == "file does not exist"
    assert "error" not in by["good.png"] and by["good.png"]["class_name"]
    assert error_lines(r.stderr) == []
    assert f"{secret}: error: permission denied: this file cannot be read" in r.stderr.splitlines()
    assert f"{locked}: error: permission denied: this folder cannot be listed" in r.stderr.splitlines()
    assert "1 of 4 file(s) predicted" in r.stdout


# ----------------------------------------------------------------- 9. messages: full disk

# The file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes a write past ``limit`` bytes fail
# as a full disk does, for real, in a child running the CLI: the small CNN's checkpoint is
# larger than the limit, nothing written before it is.
FULL_DISK_RUN = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
sys.argv = ["topocam", *{argv!r}]
from topocam.cli import main
main()
"""

SIZE = r"[\d.]+ [KMGTP]?B"


def test_a_file_size_limit_while_saving_a_checkpoint_is_said_with_the_free_space(tmp_path):
    cache = tmp_path / "cache"
    argv = ["run", "--dataset", "synthetic2d", *FAST, "--no-tracking", "--cache-dir", str(cache), "--out", str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "-c", FULL_DISK_RUN.format(limit=20_000, argv=argv)], env=child_env(),
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "enforce fail" not in r.stderr, r.stderr
    (line,) = error_lines(r.stderr)
    folder = cache / "backbones"
    assert re.fullmatch(rf"error: could not write the backbone checkpoint {re.escape(str(folder))}/\w+\.pt: the file is "
                        rf"larger than this process may write \(its file size limit, ulimit -f\); it needs about {SIZE}, {SIZE} free in "
                        rf"{re.escape(str(folder))}",
                        line), line
    assert not list(folder.glob("*.pt")) and not list(folder.glob(".*.pt.tmp*")), "no checkpoint, no temporary left"


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real filesystem of 64 KiB (tmpfs), where mounting one is allowed (root, CAP_SYS_ADMIN)."""
    where = tmp_path / "tiny"
    where.mkdir()
    mount = shutil.which("mount")
    r = subprocess.run([mount, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True, text=True) \
        if mount else None
    if r is None or r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() if r else 'no mount command'}): "
                    "the file-size-limit test covers the message")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(where)], capture_output=True)


def test_a_full_disk_while_saving_a_checkpoint_says_no_space_left_with_the_free_space(tmp_path, tiny_filesystem):
    cache = tiny_filesystem / "cache"  # a child process: nothing of it holds the filesystem when it is unmounted
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), "run", "--dataset", "synthetic2d", *FAST, "--no-tracking",
                        "--cache-dir", str(cache), "--out", str(tmp_path / "out")], env=child_env(), capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "enforce fail" not in r.stderr, r.stderr
    (line,) = error_lines(r.stderr)
    folder = cache / "backbones"
    assert re.fullmatch(rf"error: could not write the backbone checkpoint {re.escape(str(folder))}/\w+\.pt: no space left on "
                        rf"the device; it needs about {SIZE}, {SIZE} free in {re.escape(str(folder))}", line), line
    assert not list(folder.glob("*.pt")) and not list(folder.glob(".*.pt.tmp*")), "no checkpoint, no temporary left"


# ----------------------------------------------------------------- 9. messages: SIGTERM


@pytest.mark.slow
def test_sigterm_during_a_study_says_terminated_in_one_line_and_exits_143(env, tmp_path):  # noqa: F811
    """As Ctrl-C says "interrupted" and exits 130 (tests/test_scale_out.py), a real worker stopped
    by SIGTERM mid-trial ends with our one line and 128 + 15, not Optuna's ``KeyboardInterrupt()``."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = write_study(tmp_path, "sigterm", study={"grace_period": 4})
    proc, _ = start_slow_worker(env, tmp_path, study, "--sampler", "random", "--seed", "0", "--n-trials", "2", "--storage", url)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=200)[0]
    assert proc.returncode == 143, out[-3000:]
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[-1] == "terminated (SIGTERM)", out[-3000:]
    assert "KeyboardInterrupt" not in out and "Traceback" not in out and "interrupted" not in lines[-1], out[-3000:]
    (stopped, queued) = trials_of(url, "sigterm.random.s0")
    assert stopped.user_attrs["stopped"] == "worker terminated (SIGTERM)" and queued.params == stopped.params  # re-queued


# ------------------------------------------------------------ 9. messages: study files


def test_a_folder_given_as_a_study_file_is_said_to_be_a_folder(tmp_path):
    from topocam.search.studyfile import load_study

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TopoCAMError) as exc:
        load_study(empty)
    assert str(exc.value) == f"study file {empty} is a folder, not a file; pass a study file (TOML)"
    one = tmp_path / "one"
    one.mkdir()
    write_study(one, "quick")
    with pytest.raises(TopoCAMError) as exc:
        load_study(one)
    assert str(exc.value) == f"study file {one} is a folder, not a file; did you mean {one / 'quick.toml'}?"
    r = runner.invoke(app, ["study", "run", str(REPO / "studies")])
    assert r.exit_code == 2
    folder = REPO / "studies"
    shipped = sorted(folder.glob("*.toml"))  # eight study files: five named, the rest counted
    assert len(shipped) > 5
    assert error_lines(r.output) == [
        f"error: study file {folder} is a folder, not a file; did you mean one of {', '.join(map(str, shipped[:5]))} "
        f"(and {len(shipped) - 5} more)?"], r.output
    with pytest.raises(TopoCAMError, match="does not exist"):
        load_study(tmp_path / "missing.toml")


def test_an_unknown_key_in_a_suites_suite_table_is_an_error(tmp_path):
    from topocam.search.ablate import load_suite

    arms = '[[ablation]]\nname = "tau"\narms = [{ arm = "0.5", tau = 0.5 }]\n'
    typo = tmp_path / "typo.toml"
    typo.write_text('[suite]\nname = "s"\ndescripton = "a typo"\n' + arms)
    with pytest.raises(TopoCAMError) as exc:
        load_suite(typo)
    assert str(exc.value) == f"{typo}: [suite]: unknown key(s) ['descripton']; allowed: description, name"
    table = tmp_path / "table.toml"
    table.write_text('[suit]\nname = "s"\n' + arms)
    with pytest.raises(TopoCAMError) as exc:
        load_suite(table)
    assert str(exc.value) == f"{table}: unknown table(s) ['suit']; allowed: [suite], [[ablation]]"
    ok = tmp_path / "ok.toml"
    ok.write_text('[suite]\nname = "s"\ndescription = "fine"\n' + arms)
    assert load_suite(ok).description == "fine"


# ------------------------------------------------------------- 9. messages: MLflow's INFO


def test_mlflow_info_lines_are_kept_out_unless_verbose(tmp_path):
    """Opening a new local store made MLflow print "Creating initial MLflow database tables..."
    (and more) on every command's stderr; ``topocam --verbose`` shows them."""

    def explain(*root: str) -> subprocess.CompletedProcess:
        db = tmp_path / f"mlflow{len(root)}.db"  # a new, empty store each time: MLflow creates its tables
        db.touch()  # (explain opens only a store that exists: it creates none)
        return subprocess.run([sys.executable, str(REPO / "cli.py"), *root, "explain", "nosuchrun", "--tracking-uri",
                               f"sqlite:///{db}", "--out", str(tmp_path / "figs"), "--quiet"],
                              env=child_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)

    quiet = explain()
    assert quiet.returncode == 2, quiet.stderr
    lines = [line for line in quiet.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no MLflow run 'nosuchrun'"), quiet.stderr
    verbose = explain("--verbose")
    assert verbose.returncode == 2, verbose.stderr
    assert "INFO mlflow.store.db.utils: Creating initial MLflow database tables..." in verbose.stderr
    assert error_lines(verbose.stderr) == lines
