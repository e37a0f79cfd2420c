"""The MLflow UI with our runs, in a real browser.

A small SQLite store written by our ``Tracker`` (an ablation's parent run and one
nested run per arm, with validation and test AUC), served by ``mlflow ui`` on a
free loopback port; the link the CLI prints (``print_runs_link`` ->
``Tracker.runs_table_url``) opened in headless Chromium that has never seen
MLflow (no local storage): the runs table must show the arms' run names, their
``ablation``/``arm`` tags and the AUC columns, with no configuring. The
screenshot goes to tmp, and with ``TOPOCAM_UI_SCREENSHOT=docs/mlflow_runs.png`` to the
README's picture.
Skipped, with the reason, where Chromium or Playwright is absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from .shipping import REPO, free_port, running
from .test_serving import CHROMIUM, CHROMIUM_ARGS
from . import test_study
from .test_study import write_study

env, warm = test_study.env, test_study.warm  # fixtures: the study tests' store, trained backbone and CAMs

ARMS = {"gradcam": (0.8125, 0.7500), "gradcampp": (0.8250, 0.7750), "scorecam": (0.8375, 0.8000)}  # val, test AUC


def _store(runs_dir: Path):
    from topocam.tracking import Tracker

    tracker = Tracker(None, runs_dir)
    exp = tracker.experiment("ui-ablation")
    parent = tracker.start_run(exp, "ablation-cam", {"study": "ui", "kind": "ablation", "ablation": "cam"})
    for arm, (val, test) in ARMS.items():
        rid = tracker.start_run(exp, f"cam-{arm}", {"study": "ui", "kind": "ablation_arm", "ablation": "cam", "arm": arm},
                                parent=parent, params={"cam": arm, "tau": 0.6})
        tracker.log_metrics(rid, {"val_auc": val, "test_auc": test})
        tracker.finish(rid)
    tracker.finish(parent)
    return tracker, exp


def test_runs_table_link_in_headless_chromium(tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium package (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    from topocam.cli import common as cli
    from topocam.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker, tags_filter

    tracker, exp = _store(tmp_path / "mlruns")
    assert tracker._client.get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # model training, not GenAI
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    view = dict(name="cam ablation", filter=tags_filter({"ablation": "cam"}) + " and tags.arm != ''",
                metrics=["val_auc", "test_auc"], tags=["ablation", "arm"], params=["tau"], order_by="val_auc")
    with cli.console.capture() as cap:
        cli.print_runs_link(tracker, exp, ui_url=base, **view)
    printed = cap.get()
    assert f"mlflow ui --backend-store-uri {tracker.uri}" in printed
    url = re.search(r"http://\S+", printed).group(0)
    assert url.startswith(f"{base}/#/experiments/{exp}/runs?")
    assert tracker.runs_table_url(exp, ui_url=base, **view) == url  # the same view again: the same link, no new tag

    mlflow = Path(sys.executable).parent / "mlflow"
    argv = [str(mlflow), "ui", "--backend-store-uri", tracker.uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    shot = tmp_path / "mlflow_runs.png"
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with running(argv, server_env, f"{base}/health", tmp_path / "ui.log"):
        # against a tracking server, the link is on the server itself and needs no `mlflow ui`
        remote = Tracker(base, tmp_path / "unused")
        assert remote.ui_command() is None and remote.runs_table_url(exp, **view) == url

        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_context(viewport={"width": 1500, "height": 640}).new_page()  # fresh: no local storage
                page.goto(url, wait_until="load")
                for arm in ARMS:  # the arms, flat (their parent does not match the filter), best validation AUC first
                    page.get_by_text(f"cam-{arm}", exact=True).wait_for(timeout=180_000)
                grid = page.locator(".ag-root").first
                grid.get_by_text("test_auc", exact=True).wait_for(timeout=60_000)
                text = grid.inner_text()
                for header in ("Run Name", "val_auc", "test_auc", "ablation", "arm", "tau"):
                    assert header in text.split("\n"), (header, text)
                for arm, (val, test) in ARMS.items():
                    assert arm in text and f"{val:g}" in text and f"{test:g}" in text, (arm, text)
                rows = [text.index(f"cam-{arm}") for arm in ARMS]
                assert rows == sorted(rows, reverse=True), text  # sorted by validation AUC, best first
                assert "ablation-cam" not in text  # only the runs compared
                close = page.locator("button[aria-label='Close']")  # MLflow 3.17's assistant panel, open by default
                if close.count():
                    close.first.click()
                page.wait_for_timeout(500)
                page.screenshot(path=str(shot))
            finally:
                browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("TOPOCAM_UI_SCREENSHOT"):  # for the README: TOPOCAM_UI_SCREENSHOT=docs/mlflow_runs.png
        shutil.copy(shot, REPO / os.environ["TOPOCAM_UI_SCREENSHOT"])


# ------------------------------------------- the links the CLI prints, without a browser


def _view(tracker, output: str) -> tuple[str, dict]:
    """The experiment and the saved view (filter, columns, sort) of the link in a command's output."""
    from topocam.tracking import VIEW_TAG_PREFIX

    url = re.search(r"http://127\.0\.0\.1:5000/#/experiments/(\w+)/runs\?workflowType=machine_learning&viewStateShareKey=(\S+)", output)
    assert url, output
    exp, key = url.groups()
    value = json.loads(tracker._client.get_experiment(exp).tags[VIEW_TAG_PREFIX + key])
    return exp, json.loads(value["state"]) if "state" in value else value  # a named view's envelope, or the bare state


def _shown(tracker, exp: str, state: dict) -> list:
    """The runs the view's filter selects; every one has each metric column the view shows."""
    runs = tracker.search_runs([exp], filter_string=state["searchFilter"], max_results=1000)
    for col in state["selectedColumns"]:
        kind, key = re.fullmatch(r"(\w+)\.`(.+)`", col).groups()
        assert any(key in getattr(r.data, kind) for r in runs), (col, [r.data for r in runs])
    return runs


def test_study_links_show_the_runs_compared(env, warm, tmp_path):
    """``study run`` links its sampler's trials and best trial, ``study compare`` every search
    (arm, sampler, seed) with its best validation and test AUC."""
    from typer.testing import CliRunner

    from topocam.cli import app

    cli, runs = CliRunner(), str(env.runs)
    path = write_study(tmp_path, "uilinks")
    r = cli.invoke(app, ["study", "run", str(path), "--sampler", "random", "--seed", "0", "--n-trials", "2", "--runs-dir", runs, "--quiet"])
    assert r.exit_code == 0, r.output
    assert f"mlflow ui --backend-store-uri {env.tracker.uri}" in r.output
    exp, state = _view(env.tracker, r.output)
    assert {"metrics.`val_auc`", "metrics.`test_auc`"} <= set(state["selectedColumns"])
    assert state["orderByKey"] == "metrics.`val_auc`" and state["orderByAsc"] is False
    shown = _shown(env.tracker, exp, state)
    assert sorted(x.data.tags["kind"] for x in shown) == ["best", "trial", "trial"]

    r = cli.invoke(app, ["study", "compare", str(path), "--samplers", "random,de", "--seeds", "1", "--n-trials", "2",
                         "--runs-dir", runs, "--out", str(tmp_path / "cmp"), "--quiet"])
    assert r.exit_code == 0, r.output
    exp2, state = _view(env.tracker, r.output)
    shown = _shown(env.tracker, exp2, state)
    assert exp2 == exp and {x.data.tags["kind"] for x in shown} == {"sampler"}  # one row per search, trials nested
    assert {"metrics.`best_val_auc`", "metrics.`best_test_auc`"} <= set(state["selectedColumns"])
    assert {(x.data.tags["arm"], x.data.tags["sampler"]) for x in shown} >= {("topocam", "random"), ("topocam", "de")}


def test_run_link_shows_each_run_with_its_baselines(tmp_path):
    """``topocam run`` links one row per run (mean over its seeds) with TopoCAM's, the CNN's and
    Topo-Original's AUC side by side."""
    from typer.testing import CliRunner

    from topocam.cli import app
    from topocam.tracking import Tracker

    from .test_cli import FAST

    args = ["run", "--dataset", "synthetic2d", *FAST, "--seeds", "0,1", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "mlruns")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    tracker = Tracker(None, tmp_path / "mlruns")
    exp, state = _view(tracker, r.output)
    shown = _shown(tracker, exp, state)
    assert len(shown) == 1 and shown[0].data.tags["seeds"] == "0,1"  # not the seeds' own (child) runs
    for col in ("topocam_test_auc_mean", "cnn_test_auc_mean", "topo_original_test_auc_mean", "topocam_val_auc_mean"):
        assert f"metrics.`{col}`" in state["selectedColumns"]
