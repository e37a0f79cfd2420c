"""``topocam ablate`` and ``topocam explain``: ablation suites and a logged run's figures."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (
    DATA_DIR_OPTION, DEVICE_OPTION, METHOD_NAMES, OVERWRITE_HELP, QUIET_OPTION, RUNS_DIR_OPTION, STORAGE_OPTION, TRACKING_URI_OPTION,
    _checked_study, _fmt, _ints, _study_storage, app, console, ensure_writable_dir, err, fail, print_runs_link,
    refuse_earlier_results,
)

# ------------------------------------------------------------------ ablations


@app.command("ablate")
def ablate_cmd(
    study_file: Path = typer.Argument(..., help="study definition (TOML) whose best configuration is the reference"),
    suite: str = typer.Option("paper", help="suite name (studies/ablations/NAME.toml beside the study file) or a suite file"),
    seeds: str = typer.Option("", help="comma-separated model seeds (default: the study's replicate_seeds, else 0,1,2)"),
    base: str = typer.Option("best", help="reference: 'best' (the study's best trial by its validation objective) or 'file' (the study file's base)"),
    only: str = typer.Option("", help="comma-separated ablations or arms to run (e.g. tau,cam=scorecam); the others are listed as not run"),
    skip: str = typer.Option("", help="comma-separated ablations or arms to leave out (listed as not run)"),
    storage: Optional[str] = STORAGE_OPTION,
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    data_dir: Optional[Path] = DATA_DIR_OPTION,
    runs_dir: Path = RUNS_DIR_OPTION,
    out: Optional[Path] = typer.Option(None, help="folder for the tables (default: RUNS_DIR/ablate/STUDY-SUITE)"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    device: Optional[str] = DEVICE_OPTION,
    figures: bool = typer.Option(True, "--figures/--no-figures", help="log each arm's figures (Betti curves, t-SNE, CAM overlays, ROC, confusion) to its best seed's run"),
    quiet: bool = QUIET_OPTION,
):
    """Every arm of an ablation suite over seeds, beside the reference: a table (Markdown, CSV,
    JSON) with mean ± sd, bootstrap intervals and differences, one MLflow parent run."""
    from topocam import TopoCAMError
    from topocam.search.ablate import find_suite, load_suite, reference_configs, run_suite
    from topocam.tracking import Tracker

    try:
        suite_obj = load_suite(find_suite(suite, study_file))  # a bad suite fails before any store is opened
        spec, data = _checked_study(study_file, data_dir, device)  # and so do bad data
        seed_list = list(_ints(seeds, "--seeds")) if seeds.strip() else (list(spec.replicate_seeds) or [0, 1, 2])
        storage_url = _study_storage(storage, runs_dir)
        say = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
        # the study's trials, read only (no storage is made), and the data checked against what they were scored on
        reference = reference_configs(spec, storage_url, base, data if base == "best" else None, say)
        out_dir = out or runs_dir / "ablate" / f"{spec.name}-{suite_obj.name}"
        refuse_earlier_results(out_dir, overwrite)
        ensure_writable_dir(out_dir)
        tracker = Tracker(tracking_uri, runs_dir)
        split = lambda text: [v.strip() for v in text.split(",") if v.strip()] or None  # noqa: E731
        result = run_suite(spec, suite_obj, storage_url, tracker, list(dict.fromkeys(seed_list)), out_dir,
                           base=base, only=split(only), skip=split(skip), progress=not quiet, figures=figures,
                           log=say, reference=reference, data=data)
    except TopoCAMError as exc:
        fail(str(exc))
    console.print(result.files["md"].read_text(), markup=False, highlight=False, soft_wrap=True)
    console.print("wrote " + ", ".join(str(p) for p in result.files.values()))
    if result.experiment_id is not None:
        from topocam.tracking import tags_filter

        # every arm's seed runs of this suite run, arms side by side with their val/test AUC and ACC
        print_runs_link(
            tracker, result.experiment_id, name=f"ablation {suite_obj.name} ({result.parent_run[:8]})",
            filter=tags_filter({"kind": "ablation_arm", "suite": suite_obj.name}) + f" and tags.`mlflow.parentRunId` = '{result.parent_run}'",
            metrics=["test_auc", "test_acc", "val_auc", "val_acc"], tags=["ablation", "arm", "seed", "valid", "status"],
            order_by="test_auc",
        )


@app.command("explain")
def explain_cmd(
    run_id: str = typer.Argument(..., help="MLflow run id: a `topocam run` run (a seed's; a parent stands for its first seed) or a study's trial / best / export run"),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    storage: Optional[str] = STORAGE_OPTION,
    runs_dir: Path = typer.Option(Path("mlruns"), help="local MLflow store when --tracking-uri is not given"),
    data_dir: Optional[Path] = DATA_DIR_OPTION,
    cache_dir: Optional[Path] = typer.Option(None, help="checkpoint and CAM cache of the run (or TOPOCAM_CACHE_DIR; default ~/.cache/topocam)"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for the PNGs (default: RUNS_DIR/explain/RUN_ID)"),
    no_log: bool = typer.Option(False, "--no-log", help="write the PNGs only; do not log them to the run"),
    quiet: bool = QUIET_OPTION,
):
    """Figures of a logged run (Betti curves, t-SNE, CAM overlays, ROC, confusion, ROI quality), logged back to it."""
    from topocam import TopoCAMError
    from topocam.report.explain import explain_run
    from topocam.tracking import Tracker, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, runs_dir, must_exist=True)  # explain reads a store: it makes none
    if uri is None:
        fail(f"no MLflow store at {runs_dir / 'mlflow.db'}; pass --runs-dir or --tracking-uri")
    try:
        tracker = Tracker(tracking_uri, runs_dir, create=False)  # a store that is not there is an error, never made
    except TopoCAMError as exc:
        fail(str(exc))
    if not no_log and tracker.store.path is not None:
        from topocam.stores import not_writable

        why = not_writable(tracker.store.path)
        if why is not None:
            fail(f"cannot log the figures to run {run_id} in {tracker.store.path}: {why}; pass --no-log to write the PNGs only")
    out_dir = out or runs_dir / "explain" / run_id
    ensure_writable_dir(out_dir)
    try:
        res = explain_run(tracker, run_id, out_dir, data_dir=str(data_dir) if data_dir else None,
                          cache_dir=str(cache_dir) if cache_dir else None, log=not no_log, progress=not quiet,
                          storage_url=_study_storage(storage, runs_dir))
    except TopoCAMError as exc:
        fail(str(exc))
    lc = res.logged

    def say(message: str) -> None:
        console.print(message, markup=False, highlight=False, soft_wrap=True)

    if lc.note:
        say(lc.note)
    split = "test" if lc.report_test else "validation (a trial: test is not touched)"
    say(f"run {run_id} (kind={lc.kind}, {lc.config.dataset}, seed {lc.config.seed}): figures on the {split} split")
    method = METHOD_NAMES.get(lc.config.method, lc.config.method)
    for s, m in res.metrics.items():
        who = f"CNN (backbone), {s[4:]}" if s.startswith("cnn_") else f"{method}, {s}"
        say(f"re-computed {who}: AUC {_fmt(m.get('auc'))}, ACC {_fmt(m.get('acc'))}")
    if res.roi_quality:
        at = [r for r in res.roi_quality if (r["tau"] is None) == (lc.config.roi != "threshold")
              and (r["tau"] is None or r["tau"] == round(float(lc.config.tau), 4) or abs(r["tau"] - lc.config.tau) < 1e-9)]
        for r in at:
            where = f"{r['cam']} at tau {r['tau']:.2f}" if r["tau"] is not None else f"{r['generator']} from {r['cam']}"
            say(f"ROI vs true lesion, {where}: Dice {r['dice']:.3f} (random same size "
                f"{r['dice_random_same_size']:.3f}), IoU {r['iou']:.3f}, pointing game {r['pointing_game']:.3f} "
                f"(chance {r['pointing_game_chance']:.3f}), Betti error {r['betti_error']:.2f}")
    if res.degenerate:
        err.print(f"warning: {res.degenerate}", markup=False, highlight=False, style="bold yellow", soft_wrap=True)
    for m in res.mismatches:
        err.print(f"warning: differs from the logged run ({m}); was the backbone retrained (another --cache-dir)?",
                  markup=False, highlight=False, style="yellow", soft_wrap=True)
    say(f"wrote {len(res.files)} file(s) to {out_dir}")
    if res.artifacts:
        say(f"MLflow: logged {', '.join(res.artifacts)} to run {run_id} in {tracker.uri}")

