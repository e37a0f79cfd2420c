"""topocam: the command-line interface (thin: parse, call topocam, print)."""

from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from topocam.atomic import write_json_atomic
from topocam.data import DEFAULT_SYNTHETIC_N
from topocam.choices import (
    SAMPLERS, ArmChoice, BackboneChoice, BettiBackendChoice, CamChoice, OutsideChoice, PresetChoice, SamplerChoice,
)
from topocam.stats import format_mean_sd

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="TopoCAM: Betti curves of CAM-selected regions, studies and baselines.")
# piped output (a log, CI, `| tee`) has no terminal width: tables there keep their full width instead of 80 columns
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


RUNS_DIR_HELP = "local runs folder: default Optuna storage (optuna.db) and MLflow store (mlflow.db + artifacts/)"
# options several commands share (one declaration each)
STORAGE_OPTION = typer.Option(None, envvar="TOPOCAM_STORAGE", help="Optuna storage URL (default: sqlite under --runs-dir)")
TRACKING_URI_OPTION = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: sqlite under --runs-dir)")
DATA_DIR_OPTION = typer.Option(None, help="folder holding MedMNIST .npz files (or TOPOCAM_DATA_DIR)")
RUNS_DIR_OPTION = typer.Option(Path("mlruns"), help=RUNS_DIR_HELP)
QUIET_OPTION = typer.Option(False, "--quiet", help="no progress bars")

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
    from topocam.errors import TopoCAMError
    from topocam.jobs import check_n_jobs

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


METHOD_NAMES = {"topocam": "TopoCAM", "cnn": "CNN", "topo_original": "Topo-Original"}


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


def print_runs_link(tracker, experiment: str, **view) -> None:
    """Say where the runs are: the experiment and store, then the link to the runs table with the
    runs to compare and their metric columns (``Tracker.runs_table_url``'s keywords), and for a local
    store the command that serves it first."""
    name = tracker.client.get_experiment(experiment).name
    console.print(f"MLflow: experiment {name!r} in {tracker.uri}", markup=False, highlight=False, soft_wrap=True)
    serve = tracker.ui_command()
    if serve:
        console.print(f"  serve it: {serve}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"  runs table: {tracker.runs_table_url(experiment, **view)}", markup=False, highlight=False, soft_wrap=True)


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


@app.command()
def run(
    dataset: str = typer.Option("breastmnist", help="MedMNIST name, synthetic2d, synthetic3d, or path to an .npz"),
    out: Path = typer.Option(..., "--out", help="folder for metrics.json"),
    data_dir: Optional[Path] = DATA_DIR_OPTION,
    size: int = typer.Option(28, help="image size (MedMNIST: 28/64/128/224; synthetic: any >= 12)"),
    synthetic_n: str = typer.Option(",".join(map(str, DEFAULT_SYNTHETIC_N)), help="synthetic train,val,test counts"),
    data_seed: int = typer.Option(0, help="synthetic sets: the seed of the images (fixed while --seeds vary)"),
    clutter: int = typer.Option(2, help="synthetic sets: distractor objects per image (difficulty)"),
    backbone: BackboneChoice = typer.Option("auto", help="auto: resnet18 in 2D, r3d18 in 3D; small: a tiny CNN for tests and demos"),
    epochs: Optional[int] = typer.Option(None, help="backbone fine-tuning epochs [default: 10, or the preset's]"),
    batch_size: Optional[int] = typer.Option(None, help="backbone batch size [default: 32, or the preset's]"),
    lr: Optional[float] = typer.Option(None, help="backbone learning rate (Adam) [default: 0.001, or the preset's]"),
    preset: Optional[PresetChoice] = typer.Option(None, help="backbone training recipe: medmnist_v2 (100 epochs, lr/10 at 50 and 75, batch 128)"),
    cam: CamChoice = typer.Option("gradcam", help="CAM variant: Grad-CAM, Grad-CAM++ or Score-CAM"),
    weights: str = typer.Option("0.2,0.3,0.5", help="fusion weights of layer2,layer3,layer4 (normalised to sum 1)"),
    tau: float = typer.Option(0.6, help="ROI threshold on the fused map, in [0, 1]"),
    outside: OutsideChoice = typer.Option("zero", help="zero: outside voxels are 0 (paper); exclude: they never enter the filtration"),
    bins: int = typer.Option(50, help="number of Betti-curve thresholds"),
    betti_backend: BettiBackendChoice = typer.Option("fast", help="fast (exact, default) or giotto (giotto-tda, the optional extra '.[giotto]')"),
    mlp: str = typer.Option("128,64", help="MLP hidden sizes"),
    n_jobs: int = typer.Option(-1, callback=_n_jobs_option, help="worker threads for Betti curves (-1: all cores, N >= 1: N threads)"),
    seeds: str = typer.Option("0", help="model seeds (backbone and MLP), e.g. 0,1,2,3,4: one run each, then mean ± sd"),
    cache_dir: Optional[Path] = typer.Option(None, help="checkpoint and CAM cache (or TOPOCAM_CACHE_DIR; default ~/.cache/topocam)"),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    runs_dir: Path = typer.Option(Path("mlruns"), help="local MLflow store when --tracking-uri is not given"),
    no_tracking: bool = typer.Option(False, "--no-tracking", help="do not log to MLflow"),
    leakage_audit: bool = typer.Option(False, "--leakage-audit", help="ablation ONLY: CAMs target the true label (leaks labels)"),
    quiet: bool = QUIET_OPTION,
):
    """Run TopoCAM over one or more seeds and compare it with the CNN and Topo-Original baselines."""
    import warnings

    from topocam import TopoCAMError
    from topocam.errors import DegenerateBackboneWarning
    from topocam.pipeline import TopoCAMConfig, run as run_pipeline

    n = _ints(synthetic_n, "--synthetic-n")
    if len(n) != 3:
        fail(f"--synthetic-n needs three counts train,val,test, got {synthetic_n!r}")
    seed_list = list(dict.fromkeys(_ints(seeds, "--seeds")))
    if not seed_list or min(seed_list) < 0:
        fail(f"--seeds needs one or more integers >= 0, e.g. 0,1,2,3,4; got {seeds!r}")
    try:
        from topocam.backbone import training_recipe

        recipe = training_recipe(_value(preset), epochs=epochs, batch_size=batch_size, lr=lr)
        cfg = TopoCAMConfig(
            dataset=dataset, data_dir=str(data_dir) if data_dir else None, size=size, synthetic_n=n,
            data_seed=data_seed, clutter=clutter,
            backbone=backbone.value, epochs=recipe["epochs"], batch_size=recipe["batch_size"], lr=recipe["lr"],
            lr_milestones=tuple(recipe["milestones"]), seed=seed_list[0], cam=cam.value,
            weights=_floats(weights, "--weights"), tau=tau, outside=outside.value, bins=bins, betti_backend=betti_backend.value,
            mlp=_ints(mlp, "--mlp"), n_jobs=n_jobs, cache_dir=str(cache_dir) if cache_dir else None,
            cam_target="label" if leakage_audit else "predicted",
        ).validated()
        with output_dir(out):
            if not no_tracking:  # open the store now: a bad URI fails before any training
                from topocam.tracking import Tracker

                Tracker(tracking_uri, runs_dir)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DegenerateBackboneWarning)  # reported below, per seed, loudly
                result = run_pipeline(cfg, seeds=seed_list, progress=not quiet)
            if leakage_audit:
                result["leakage_audit"] = "CAM target = TRUE LABEL: these numbers leak labels and are not a valid result"
            write_json_atomic(out / "metrics.json", result)
    except TopoCAMError as exc:
        fail(str(exc))
    except MemoryError:
        fail(f"out of memory for {dataset} at --size {size} (synthetic counts {synthetic_n}); "
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
            f"pointing game {format_mean_sd(q['pointing_game'])} (chance {format_mean_sd(q['pointing_game_random'])})", markup=False, highlight=False,
        )
    if leakage_audit:
        console.print("[bold yellow]leakage audit: CAMs targeted the true label; not a valid result[/]")
    console.print(f"wrote {out / 'metrics.json'}", markup=False, highlight=False)
    if not no_tracking:
        try:
            _log_run(result, tracking_uri, runs_dir)
        except TopoCAMError as exc:
            fail(f"results are in {out / 'metrics.json'}, but MLflow logging failed: {exc}")


study_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Optuna studies over TopoCAM's knobs, tracked in MLflow.")
app.add_typer(study_app, name="study")



def _study_setup(study_file: Path, data_dir, storage, tracking_uri, runs_dir: Path, quiet: bool):
    from topocam.search.runner import StudyRunner
    from topocam.search.storage import default_storage
    from topocam.search.studyfile import load_study

    import optuna

    # one line per trial from Optuna's logger would bury the trial bar (trials, best, ETA);
    # every trial's parameters and metrics are in MLflow and `topocam study status`
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_study(study_file, data_dir=str(data_dir) if data_dir else None)
    if storage is None:
        runs_dir.mkdir(parents=True, exist_ok=True)
        storage = default_storage(runs_dir)
    return spec, StudyRunner.open(spec, storage, tracking_uri, runs_dir, progress=not quiet)


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
    quiet: bool = QUIET_OPTION,
):
    """Run or resume one (sampler, seed) of a study; start it again to add workers."""
    from topocam import TopoCAMError

    try:
        from topocam.choices import check_sampler_seed

        if seed is not None:
            check_sampler_seed(seed)  # before any store is opened or backbone trained
        spec, runner = _study_setup(study_file, data_dir, storage, tracking_uri, runs_dir, quiet)
        sampler = _value(sampler) or spec.samplers[0]
        arm = arm.value
        seed = spec.seeds[0] if seed is None else seed
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
    quiet: bool = QUIET_OPTION,
):
    """Every sampler on the same budget and seeds: table, plot, all in MLflow."""
    from topocam import TopoCAMError
    from topocam.search.compare import compare

    try:
        spec, runner = _study_setup(study_file, data_dir, storage, tracking_uri, runs_dir, quiet)
        names = [s.strip() for s in samplers.split(",") if s.strip()] if samplers else list(spec.samplers)
        seed_list = list(range(seeds)) if seeds is not None else list(spec.seeds)
        budget = n_trials or spec.n_trials
        with output_dir(out or runs_dir / "compare" / spec.name) as out_dir:
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


@study_app.command("status")
def study_status_cmd(
    study_name: str = typer.Argument(..., help="the [study] name of a study file"),
    storage: Optional[str] = STORAGE_OPTION,
    runs_dir: Path = RUNS_DIR_OPTION,
):
    """Trials done / running / failed and the best value, per sampler and seed."""
    from topocam import TopoCAMError
    from topocam.search.status import study_status
    from topocam.search.storage import default_storage

    if storage is None:
        if not (runs_dir / "optuna.db").is_file():
            fail(f"no study storage at {runs_dir / 'optuna.db'}; run a study first or pass --storage")
        storage = default_storage(runs_dir)
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
    figures: bool = typer.Option(True, "--figures/--no-figures", help="log each arm's figures (Betti curves, t-SNE, CAM overlays, ROC, confusion) to its best seed's run"),
    quiet: bool = QUIET_OPTION,
):
    """Every arm of an ablation suite over seeds, beside the reference: a table (Markdown, CSV,
    JSON) with mean ± sd, bootstrap intervals and differences, one MLflow parent run."""
    from topocam import TopoCAMError
    from topocam.search.ablate import find_suite, load_suite, run_suite

    try:
        suite_obj = load_suite(find_suite(suite, study_file))  # a bad suite fails before any store is opened
        spec, runner = _study_setup(study_file, data_dir, storage, tracking_uri, runs_dir, quiet)
        seed_list = list(_ints(seeds, "--seeds")) if seeds.strip() else (list(spec.replicate_seeds) or [0, 1, 2])
        out_dir = out or runs_dir / "ablate" / f"{spec.name}-{suite_obj.name}"
        ensure_writable_dir(out_dir)
        split = lambda text: [v.strip() for v in text.split(",") if v.strip()] or None  # noqa: E731
        result = run_suite(spec, suite_obj, runner.storage_url, runner.tracker, list(dict.fromkeys(seed_list)), out_dir,
                           base=base, only=split(only), skip=split(skip), progress=not quiet, figures=figures, log=lambda m: console.print(m, markup=False, highlight=False))
    except TopoCAMError as exc:
        fail(str(exc))
    console.print(result.files["md"].read_text(), markup=False, highlight=False, soft_wrap=True)
    console.print("wrote " + ", ".join(str(p) for p in result.files.values()))
    if result.experiment_id is not None:
        from topocam.tracking import tags_filter

        # every arm's seed runs of this suite run, arms side by side with their val/test AUC and ACC
        print_runs_link(
            runner.tracker, result.experiment_id, name=f"ablation {suite_obj.name} ({result.parent_run[:8]})",
            filter=tags_filter({"kind": "ablation_arm", "suite": suite_obj.name}) + f" and tags.`mlflow.parentRunId` = '{result.parent_run}'",
            metrics=["test_auc", "test_acc", "val_auc", "val_acc"], tags=["ablation", "arm", "seed", "valid", "status"],
            order_by="test_auc",
        )



@app.command("explain")
def explain_cmd(
    run_id: str = typer.Argument(..., help="MLflow run id: a `topocam run` run (a seed's; a parent stands for its first seed) or a study's trial / best / export run"),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    runs_dir: Path = typer.Option(Path("mlruns"), help="local MLflow store when --tracking-uri is not given"),
    data_dir: Optional[Path] = DATA_DIR_OPTION,
    cache_dir: Optional[Path] = typer.Option(None, help="checkpoint and CAM cache of the run (or TOPOCAM_CACHE_DIR; default ~/.cache/topocam)"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for the PNGs (default: RUNS_DIR/explain/RUN_ID)"),
    no_log: bool = typer.Option(False, "--no-log", help="write the PNGs only; do not log them to the run"),
    quiet: bool = QUIET_OPTION,
):
    """Figures of a logged run (Betti curves, t-SNE, CAM overlays, ROC, confusion, ROI quality), logged back to it."""
    from topocam import TopoCAMError
    from topocam.explain_run import explain_run
    from topocam.tracking import Tracker

    if tracking_uri is None and not (runs_dir / "mlflow.db").is_file():
        fail(f"no MLflow store at {runs_dir / 'mlflow.db'}; pass --runs-dir or --tracking-uri")
    out_dir = out or runs_dir / "explain" / run_id
    ensure_writable_dir(out_dir)
    try:
        tracker = Tracker(tracking_uri, runs_dir)
        res = explain_run(tracker.client, run_id, out_dir, data_dir=str(data_dir) if data_dir else None,
                          cache_dir=str(cache_dir) if cache_dir else None, log=not no_log, progress=not quiet)
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
        at = [r for r in res.roi_quality if r["tau"] == round(float(lc.config.tau), 4) or abs(r["tau"] - lc.config.tau) < 1e-9]
        for r in at:
            say(f"ROI vs true lesion, {r['cam']} at tau {r['tau']:.2f}: Dice {r['dice']:.3f} (random same size "
                f"{r['dice_random_same_size']:.3f}), IoU {r['iou']:.3f}, pointing game {r['pointing_game']:.3f} "
                f"(chance {r['pointing_game_chance']:.3f})")
    if res.degenerate:
        err.print(f"warning: {res.degenerate}", markup=False, highlight=False, style="bold yellow", soft_wrap=True)
    for m in res.mismatches:
        err.print(f"warning: differs from the logged run ({m}); was the backbone retrained (another --cache-dir)?",
                  markup=False, highlight=False, style="yellow", soft_wrap=True)
    say(f"wrote {len(res.files)} file(s) to {out_dir}")
    if res.artifacts:
        say(f"MLflow: logged {', '.join(res.artifacts)} to run {run_id} in {tracker.uri}")

# ------------------------------------------------------------------ shipping

MODEL_HELP = "model URI: models:/NAME@champion, models:/NAME/VERSION, runs:/RUN/model or a local model folder"
TRACKING_HELP = "MLflow tracking/registry URI for models:/ URIs (default: $MLFLOW_TRACKING_URI, else RUNS_DIR/mlflow.db)"


def _load_model(model: str, tracking_uri: Optional[str], runs_dir: Path):
    from topocam.deploy.serve import load_model, resolve_tracking_uri

    return load_model(model, resolve_tracking_uri(tracking_uri, runs_dir))


@app.command("export")
def export_cmd(
    study_file: Path = typer.Argument(..., help="study definition (TOML) whose trials to export from"),
    name: str = typer.Option(..., "--name", help="registered model name; each export adds a version and moves the alias 'champion' to it"),
    sampler: Optional[SamplerChoice] = typer.Option(None, help="only this sampler's trials (default: all samplers)"),
    seed: Optional[int] = typer.Option(None, help="only this sampler seed's trials (default: all seeds)"),
    trial: Optional[int] = typer.Option(None, help="export this trial number instead of the best (needs one sampler and seed)"),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default: sqlite under --runs-dir)"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: sqlite under --runs-dir)"),
    data_dir: Optional[Path] = DATA_DIR_OPTION,
    runs_dir: Path = RUNS_DIR_OPTION,
    quiet: bool = QUIET_OPTION,
):
    """Export the best trial of a study as a registered MLflow model (alias 'champion')."""
    import os

    from topocam import TopoCAMError

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        from topocam.deploy.export import check_model_name, export

        check_model_name(name)
        sampler = _value(sampler)
        if storage is None and not (runs_dir / "optuna.db").is_file():
            fail(f"no study storage at {runs_dir / 'optuna.db'}; run the study first or pass --storage / --runs-dir")
        spec, runner = _study_setup(study_file, data_dir, storage, tracking_uri, runs_dir, quiet)
        res = export(spec, name, runner.storage_url, runner.tracker, sampler, seed, trial, progress=not quiet,
                     log=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True))
    except TopoCAMError as exc:
        fail(str(exc))
    m = spec.metric.upper()
    c = res.choice
    lines = [
        f"registered {res.name} version {res.version} (alias champion) from {c.optuna_study} trial {c.trial}",
        f"validation {m} {_fmt(res.val.get(spec.metric))}, test {m} {_fmt(res.test.get(spec.metric))} (test: provenance only)",
        f"model: {res.alias_uri} = {res.model_uri}; run {res.run_id}; tracking {res.tracking_uri}",
        f"serve: topocam serve --model {res.alias_uri} --runs-dir {runs_dir}" if tracking_uri is None else
        f"serve: MLFLOW_TRACKING_URI={tracking_uri} topocam serve --model {res.alias_uri}",
    ]
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command("serve")
def serve_cmd(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    port: int = typer.Option(5000, help="port on --host"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (default loopback only)"),
    workers: int = typer.Option(1, help="uvicorn worker processes"),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
    runs_dir: Path = RUNS_DIR_OPTION,
):
    """`mlflow models serve --env-manager local` for a model, working without an activated venv."""
    import os

    from topocam import TopoCAMError
    from topocam.deploy.serve import check_port_free, resolve_tracking_uri, serve_command

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = resolve_tracking_uri(tracking_uri, runs_dir)
    try:
        if workers < 1:
            raise TopoCAMError("--workers must be >= 1")
        check_port_free(host, port)
        _check_model_exists(model, uri)
    except TopoCAMError as exc:
        fail(str(exc))
    argv, env = serve_command(model, host, port, uri, workers)
    err.print(f"serving {model} on http://{host}:{port}/invocations (POST JSON {{\"inputs\": [image, ...]}}); Ctrl-C stops",
              markup=False, highlight=False, soft_wrap=True)
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


def _check_model_exists(model: str, tracking_uri: Optional[str]) -> None:
    """A quick, one-line failure for a model URI that does not resolve (reads MLmodel only)."""
    from topocam import TopoCAMError
    from topocam.deploy.serve import check_registry

    import mlflow

    check_registry(model, tracking_uri)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)  # the registry follows it
    try:
        mlflow.models.get_model_info(model)
    except Exception as exc:  # MlflowException / OSError: the URI does not name a model here
        msg = (str(getattr(exc, "message", "") or exc).splitlines() or [type(exc).__name__])[0][:300]
        where = f" in {tracking_uri}" if tracking_uri and model.startswith("models:/") else ""
        raise TopoCAMError(f"cannot find model {model!r}{where}: {msg}") from None


@app.command("predict")
def predict_cmd(
    files: list[Path] = typer.Argument(..., help="image files and/or folders (2D: .png .jpg .jpeg .npy; 3D: .npy .nii .nii.gz)"),
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", help="folder for predictions.jsonl and overlays/"),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
    runs_dir: Path = RUNS_DIR_OPTION,
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
):
    """Apply an exported model to image files: predictions.jsonl and a CAM/ROI overlay per file."""
    from topocam import TopoCAMError
    from topocam.deploy.predict import predict_files

    try:
        with output_dir(out):
            _, m = _load_model(model, tracking_uri, runs_dir)
            summary = predict_files(m, files, out, progress=not quiet)
    except TopoCAMError as exc:
        fail(str(exc))
    for r in summary.records:
        if "error" in r:
            err.print(f"{r['file']}: error: {r['error']}", markup=False, highlight=False, soft_wrap=True)
    n, bad = len(summary.records), summary.n_failed
    for r in [r for r in summary.records if "error" not in r][:20]:
        console.print(f"{r['file']}: {r['class_name']} (p = {r['probabilities'][r['class']]:.3f}), "
                      f"ROI {r['roi_fraction']:.1%}", markup=False, highlight=False)
    if n - bad > 20:
        console.print(f"... and {n - bad - 20} more", markup=False)
    console.print(f"{n - bad} of {n} file(s) predicted; wrote {summary.jsonl} and {summary.overlays}/", markup=False,
                  highlight=False, soft_wrap=True)
    if bad:
        raise typer.Exit(1)


@app.command("app")
def app_cmd(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    port: int = typer.Option(8000, help="port on --host"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (default loopback only)"),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
    runs_dir: Path = RUNS_DIR_OPTION,
):
    """A web page over a model: upload an image, see class, probabilities, CAM, ROI and provenance."""
    from topocam import TopoCAMError
    from topocam.deploy.app import run_app
    from topocam.deploy.serve import check_port_free

    try:
        check_port_free(host, port)
        _, m = _load_model(model, tracking_uri, runs_dir)
    except TopoCAMError as exc:
        fail(str(exc))
    err.print(f"TopoCAM page for {model}: http://{host}:{port}/ (Ctrl-C stops)", markup=False, highlight=False, soft_wrap=True)
    run_app(m, model, host, port)


def _stop(signum: int, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (a scheduler, `kill`) stops a worker as Ctrl-C does


def _show_warning(python_show, message, category, filename, lineno, file=None, line=None) -> None:
    """A store or cache entry found damaged and set aside is said in one line, not Python's two."""
    from topocam.errors import CorruptCacheWarning, DamagedStoreWarning

    if issubclass(category, (CorruptCacheWarning, DamagedStoreWarning)):
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
