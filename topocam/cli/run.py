"""``topocam run``: TopoCAM and its baselines over seeds, one configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from topocam.core.atomic import write_json_atomic
from topocam.core.backbone import PresetChoice
from topocam.core.settings import run_options
from topocam.core.stats import format_mean_sd

from .options import parse, with_setting_options
from .common import (
    METHOD_NAMES, OVERWRITE_HELP, QUIET_OPTION, TRACKING_URI_OPTION, _fmt, _ints, _n_jobs_option, _value, app, console, err,
    fail, output_dir, print_runs_link, refuse_earlier_results,
)


def metrics_table(result: dict) -> Table:
    seeds = result["seeds"]
    t = Table(title=f"{result['dataset']['name']}: mean ± sd over seeds {seeds}", title_justify="left",
              caption="CI: stratified bootstrap 95 % interval of the seed-mean test AUC", caption_justify="left")
    t.add_column("method", no_wrap=True)
    cols = [("val", "auc"), ("val", "acc"), ("test", "auc"), ("test", "acc")]
    for split, m in cols:
        t.add_column(f"{split} {m.upper()}", justify="right", no_wrap=True)
    t.add_column("test AUC CI", justify="right", no_wrap=True)
    for key, name in METHOD_NAMES.items():
        summ = result["summary"][key]
        lo, hi = summ["test"]["auc"]["ci95"]
        t.add_row(name, *[format_mean_sd(summ[split][m]) for split, m in cols], f"[{_fmt(lo)}, {_fmt(hi)}]")
    return t


def _log_run(result: dict, tracking_uri: str | None, runs_dir: Path) -> None:
    from topocam.tracking import Tracker, log_topocam_run

    tracker = Tracker(tracking_uri, runs_dir)
    experiment = tracker.experiment(log_topocam_run(tracker, result))
    # one row per `topocam run`: its means over seeds (each seed's run is a child run, on the run's page)
    print_runs_link(
        tracker, experiment, name="topocam run: TopoCAM vs baselines", filter="tags.kind = 'run' and tags.seeds != ''",
        metrics=[f"{m}_{s}_auc_mean" for s in ("test", "val") for m in ("topocam", "cnn", "topo_original")],
        params=["cam", "tau", "weights"], tags=["seeds", "leakage_audit", "degenerate_backbone"], order_by="topocam_val_auc_mean",
    )


def config_from_options(settings: dict, preset: str | None, seed: int, leakage_audit: bool):
    """The configuration ``topocam run``'s options stand for: each setting as given, else its
    default; the backbone's recipe from ``--preset`` where a recipe setting is not given."""
    from topocam.core.backbone import training_recipe
    from topocam.core.settings import SETTINGS, TopoCAMConfig, recipe_settings

    try:
        given = {k: parse(SETTINGS[k], v) for k, v in settings.items()}
    except ValueError as exc:
        fail(str(exc))
    recipe = training_recipe(preset, **{key: given.pop(s.name) for key, s in recipe_settings().items()})
    given.update({s.name: SETTINGS[s.name].check(recipe[key]) for key, s in recipe_settings().items()})
    return TopoCAMConfig(**{k: v for k, v in given.items() if v is not None}, seed=seed,
                         cam_target="label" if leakage_audit else "predicted").validated()


@app.command()
@with_setting_options(run_options(), callbacks={"n_jobs": _n_jobs_option})
def run(
    out: Path = typer.Option(..., "--out", help="folder for metrics.json"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    preset: Optional[PresetChoice] = typer.Option(None, help="backbone training recipe: medmnist_v2 (100 epochs, lr/10 at 50 and 75, batch 128)"),
    seeds: str = typer.Option("0", help="model seeds (backbone and MLP), e.g. 0,1,2,3,4: one run each, then mean ± sd"),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    runs_dir: Path = typer.Option(Path("mlruns"), help="local MLflow store when --tracking-uri is not given"),
    no_tracking: bool = typer.Option(False, "--no-tracking", help="do not log to MLflow"),
    leakage_audit: bool = typer.Option(False, "--leakage-audit", help="ablation ONLY: CAMs target the true label (leaks labels)"),
    quiet: bool = QUIET_OPTION,
    settings: dict = None,
):
    """Run TopoCAM over one or more seeds and compare it with the CNN and Topo-Original baselines."""
    import warnings

    from topocam import TopoCAMError
    from topocam.core.errors import DegenerateBackboneWarning
    from topocam.core.pipeline import load_checked, run as run_pipeline

    seed_list = list(dict.fromkeys(_ints(seeds, "--seeds")))
    if not seed_list or min(seed_list) < 0:
        fail(f"--seeds needs one or more integers >= 0, e.g. 0,1,2,3,4; got {seeds!r}")
    dataset, size = settings["dataset"], settings["size"]
    try:
        cfg = config_from_options(settings, _value(preset), seed_list[0], leakage_audit)
        data = load_checked(cfg)  # bad data fails here, before any folder or store is made
        refuse_earlier_results(out, overwrite)
        with output_dir(out):
            if not no_tracking:  # open the store now: a bad URI fails before any training
                from topocam.tracking import Tracker

                Tracker(tracking_uri, runs_dir)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DegenerateBackboneWarning)  # reported below, per seed, loudly
                result = run_pipeline(cfg, seeds=seed_list, progress=not quiet, data=data)
            if leakage_audit:
                result["leakage_audit"] = "CAM target = TRUE LABEL: these numbers leak labels and are not a valid result"
            write_json_atomic(out / "metrics.json", result)
    except TopoCAMError as exc:
        fail(str(exc))
    except MemoryError:
        fail(f"out of memory for {dataset} at --size {size} (synthetic counts {settings['synthetic_n']}); "
             "lower --size or --synthetic-n, or free memory")
    console.print(metrics_table(result))
    for r in result["runs"]:
        tm, bb = r["timings_s"], r["backbone"]
        console.print(
            f"seed {r['seed']}: backbone {bb['arch']} ({bb['init']}{', cached' if bb['cached'] else ''}), "
            f"best epoch {bb['best_epoch']} by {bb['selected_by']}; predicted classes {bb['predicted_counts']}; "
            "stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in tm.items()),
            markup=False, highlight=False,
        )
        if bb["degenerate"]:
            err.print(f"warning: seed {r['seed']}: {bb['message']}", markup=False, highlight=False, style="bold yellow", soft_wrap=True)
    q = result["summary"].get("roi_quality")
    if q:
        console.print(
            f"ROI vs true lesion (test): Dice {format_mean_sd(q['dice'])} (random mask of same size {format_mean_sd(q['dice_random_same_size'])}), "
            f"IoU {format_mean_sd(q['iou'])}, pointing game {format_mean_sd(q['pointing_game'])} "
            f"(chance {format_mean_sd(q['pointing_game_random'])}), Betti error {format_mean_sd(q['betti_error'])} "
            f"(ROI generator: {result['config']['roi']})", markup=False, highlight=False,
        )
    if leakage_audit:
        console.print("[bold yellow]leakage audit: CAMs targeted the true label; not a valid result[/]")
    console.print(f"wrote {out / 'metrics.json'}", markup=False, highlight=False)
    if not no_tracking:
        try:
            _log_run(result, tracking_uri, runs_dir)
        except TopoCAMError as exc:
            fail(f"results are in {out / 'metrics.json'}, but MLflow logging failed: {exc}")

