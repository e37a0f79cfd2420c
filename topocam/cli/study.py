"""``topocam study prepare | run | compare | status``: Optuna studies."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from topocam.core.choices import ArmChoice
from topocam.search.samplers import SAMPLERS, SamplerChoice

from .common import (
    DATA_DIR_OPTION, DEVICE_OPTION, OVERWRITE_HELP, QUIET_OPTION, RUNS_DIR_OPTION, STORAGE_OPTION, TRACKING_URI_OPTION, _fmt,
    _sampler_list_option, _study_setup, _value, app, console, err, fail, output_dir, print_runs_link, refuse_earlier_results,
)

study_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Optuna studies over TopoCAM's knobs, tracked in MLflow.")
app.add_typer(study_app, name="study")


@study_app.command("prepare")
def study_prepare(
    study_file: Path = typer.Argument(..., help="study definition (TOML), e.g. studies/breastmnist.toml"),
    storage: Optional[str] = STORAGE_OPTION,
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    data_dir: Optional[Path] = DATA_DIR_OPTION,
    runs_dir: Path = RUNS_DIR_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    quiet: bool = QUIET_OPTION,
):
    """Build the study's model once (each model seed's backbone, CNN probabilities and every searched
    CAM variant) and publish it to the MLflow artifact store, digests recorded in the Optuna storage:
    every worker then fetches and verifies it instead of training its own."""
    from topocam import TopoCAMError

    try:
        spec, runner = _study_setup(study_file, data_dir, storage, tracking_uri, runs_dir, quiet, device)
        models = runner.prepare_model()
    except TopoCAMError as exc:
        fail(str(exc))
    t = Table(title=f"{spec.name}: the model every worker fetches", title_justify="left")
    for c in ("seed", "entry", "MB", "sha256"):
        t.add_column(c, justify="right" if c in ("seed", "MB") else "left", no_wrap=True)
    for m in models:
        for e in m.entries.all:
            a = m.artifacts[e]
            t.add_row(str(m.seed), e, f"{a.bytes / 1e6:.2f}", a.sha256[:16])
    console.print(t)
    total = sum(m.artifacts[e].bytes for m in models for e in m.entries.all)
    times = ", ".join(f"{k.removeprefix('artifacts_')} {v:.1f} s" for k, v in runner.timings_s.items() if k.startswith("artifacts_"))
    console.print(f"{len(models)} model seed(s), {total / 1e6:.1f} MB, {models[0].how if len(models) == 1 else ', '.join(m.how for m in models)}"
                  f"{'; ' + times if times else ''}", markup=False)


@study_app.command("run")
def study_run(
    study_file: Path = typer.Argument(..., help="study definition (TOML), e.g. studies/quickstart.toml"),
    sampler: Optional[SamplerChoice] = typer.Option(None, help="the Optuna sampler (default: the file's first)"),
    arm: ArmChoice = typer.Option("topocam", help="topocam, or topo_original: the whole-image baseline on the same budget"),
    n_trials: Optional[int] = typer.Option(None, min=1, help="budget (default: the file's n_trials); finished trials count"),
    seed: Optional[int] = typer.Option(None, help="sampler seed (default: the file's first seed)"),
    storage: Optional[str] = STORAGE_OPTION,
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    data_dir: Optional[Path] = DATA_DIR_OPTION,
    runs_dir: Path = RUNS_DIR_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    quiet: bool = QUIET_OPTION,
):
    """Run or resume one (sampler, seed) of a study; start it again to add workers."""
    from topocam import TopoCAMError

    try:
        from topocam.core.choices import check_sampler_seed

        if seed is not None:
            check_sampler_seed(seed)  # before any store is opened or backbone trained
        spec, runner = _study_setup(study_file, data_dir, storage, tracking_uri, runs_dir, quiet, device)
        sampler = _value(sampler) or spec.samplers[0]
        arm = arm.value
        seed = spec.seeds[0] if seed is None else seed
        runner.preflight(sampler, seed, arm)  # objective, definition and data checked before the baselines train
        runner.log_baselines()
        runner = runner.for_arm(arm)
        r = runner.run(sampler, seed, n_trials)
    except TopoCAMError as exc:
        fail(str(exc))
    test = r.test or {}
    console.print(
        f"{spec.name} ({arm}, {sampler}, seed {seed}): {len(r.values)} trials ({r.n_failed} failed), "
        f"best val {spec.metric.upper()} {_fmt(r.best_value)} at trial {r.best_trial}; "
        f"its test {spec.metric.upper()} {_fmt(test.get(spec.metric))}",
        markup=False, soft_wrap=True,  # "[tpe, seed 0]" is not markup
    )
    console.print(f"best parameters: {r.best_params}", markup=False, highlight=False, soft_wrap=True)
    if r.failures:
        from topocam.search.compare import failures_text

        err.print(failures_text([r]).strip(), markup=False, highlight=False, soft_wrap=True, style="yellow")
    from topocam.tracking import tags_filter

    m = spec.metric
    print_runs_link(
        runner.tracker, runner.experiment,  # not named: one per arm, sampler and seed would crowd the Views menu
        filter=tags_filter({"study": spec.name, "arm": arm, "sampler": sampler, "seed": seed}) + " and tags.kind != 'sampler'",
        metrics=list(dict.fromkeys([spec.objective, f"val_{m}", f"test_{m}"])), order_by=spec.objective,
        params=[k for k, p in spec.space.items() if p.kind != "fixed"], tags=["kind", "trial"],
    )
    if not any(math.isfinite(v) for v in r.values):
        fail(f"{spec.name} ({arm}, {sampler}, seed {seed}) has no trial with a finite {spec.objective} "
             f"({len(r.values)} trial(s), {r.n_failed} failed; errors above): there is no result", code=1)


@study_app.command("compare")
def study_compare(
    study_file: Path = typer.Argument(..., help="study definition (TOML)"),
    samplers: Optional[str] = typer.Option(None, callback=_sampler_list_option,
                                           help=f"comma-separated samplers, of {', '.join(SAMPLERS)} (default: the file's)"),
    seeds: Optional[int] = typer.Option(None, min=1, help="number of seeds 0..N-1 (default: the file's seed list)"),
    n_trials: Optional[int] = typer.Option(None, min=1, help="budget per sampler and seed (default: the file's)"),
    storage: Optional[str] = STORAGE_OPTION,
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    data_dir: Optional[Path] = DATA_DIR_OPTION,
    runs_dir: Path = RUNS_DIR_OPTION,
    out: Optional[Path] = typer.Option(None, help="folder for the table and plot (default: RUNS_DIR/compare/STUDY)"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    device: Optional[str] = DEVICE_OPTION,
    quiet: bool = QUIET_OPTION,
):
    """Every sampler on the same budget and seeds: table, plot, all in MLflow."""
    from topocam import TopoCAMError
    from topocam.search.compare import compare

    try:
        spec, runner = _study_setup(study_file, data_dir, storage, tracking_uri, runs_dir, quiet, device)
        names = [s.strip() for s in samplers.split(",") if s.strip()] if samplers else list(spec.samplers)
        seed_list = list(range(seeds)) if seeds is not None else list(spec.seeds)
        budget = n_trials or spec.n_trials
        out = out or runs_dir / "compare" / spec.name
        refuse_earlier_results(out, overwrite)
        with output_dir(out) as out_dir:
            result = compare(runner, names, seed_list, budget, out_dir)
    except TopoCAMError as exc:
        fail(str(exc))
    console.print(result.files["table_md"].read_text(), markup=False, highlight=False, soft_wrap=True)  # "[min, max]" is not markup
    console.print("wrote " + ", ".join(str(p) for p in result.files.values()))
    from topocam.tracking import tags_filter

    m = spec.metric
    print_runs_link(  # one row per search (arm, sampler, seed), its trials nested; the table and plot are on kind=comparison
        runner.tracker, runner.experiment, name="samplers and arms: the best of each search",
        filter=tags_filter({"study": spec.name, "kind": "sampler"}),
        metrics=[f"best_{spec.objective}", f"best_test_{m}"] + ([f"replicated_test_{m}_mean"] if spec.replicate_seeds else []),
        tags=["arm", "sampler", "seed", "budget"], order_by=f"best_{spec.objective}",
    )
    from topocam.search.runner import optuna_name

    empty = [optuna_name(spec, r.sampler, r.seed, arm) for arm, runs in (("topocam", result.runs), ("topo_original", result.base_runs))
             for r in runs if not any(map(math.isfinite, r.values))]
    if empty:  # any search without a result: the comparison is incomplete
        fail(f"{spec.name}: {len(empty)} search(es) have no trial with a finite {spec.objective} ({', '.join(empty)}; "
             "errors in the table above): their rows compare nothing", code=1)


@study_app.command("status")
def study_status_cmd(
    study_name: str = typer.Argument(..., help="the [study] name of a study file"),
    storage: Optional[str] = STORAGE_OPTION,
    runs_dir: Path = RUNS_DIR_OPTION,
):
    """Trials done / running / failed and the best value, per sampler and seed. Reads the storage
    only: one that is not there is an error, never made; a read-only one is read."""
    from topocam import TopoCAMError
    from topocam.search.status import study_status

    from .common import _study_storage

    storage = _study_storage(storage, runs_dir)
    try:
        rows = study_status(study_name, storage)
    except TopoCAMError as exc:
        fail(str(exc))
    t = Table(title=f"{study_name} in {storage}", title_justify="left",
              caption="done: completed trials; best: best objective value so far; trial: its number", caption_justify="left")
    for c in ("study", "done", "running", "failed", "best", "trial"):  # short headers: full study names fit 80 columns
        t.add_column(c, justify="left" if c == "study" else "right", no_wrap=True)
    for r in rows:
        t.add_row(r["study"], str(r["complete"]), str(r["running"]), str(r["failed"]), _fmt(r["best_value"]), str(r["best_trial"]))
    console.print(t)

