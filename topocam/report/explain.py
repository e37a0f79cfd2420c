"""``topocam explain``: the figures of a logged run, re-computed and logged back to it.

A run's configuration is read from what was logged:

* a ``topocam run`` run (``kind=run``): the parent run holds every
  :class:`~topocam.core.pipeline.TopoCAMConfig` field as a parameter (not the data
  or cache folders) and the data fingerprint; a seed's run holds the seed. The
  parent itself stands for its first seed;
* a study's ``kind=trial``, ``kind=best`` or ``kind=export`` run: its parameters
  are the searched ones; the base configuration is the study file logged on the
  sampler run (its parent, artifact ``study/<file>.toml``), the method its
  ``arm`` tag. A trial is not a reported configuration, so its figures use the
  validation split and never touch test (DESIGN.md section 2.5); best and
  export runs are reported ones (test).

The data are checked first, before anything trains: their content fingerprint must be
the one the run logged (a ``topocam run`` run's parameter ``data_fingerprint``; a study
run's sampler run's tag ``data_fingerprint``, the fingerprint its Optuna study recorded;
a study from before it was recorded is said in one warning line). The context is then
re-built with :func:`topocam.core.pipeline.prepare` (the backbone and
CAM caches make it cheap when the cache folder is the run's), the figures drawn
by :func:`topocam.tracking.figures.explain`, and the re-computed metrics compared with
the logged ones: a difference (a retrained backbone, other data) is reported,
never hidden.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.errors import DegenerateBackboneWarning, TopoCAMError
from ..core.pipeline import TopoCAMConfig

RUN_KINDS = ("run", "trial", "best", "export", "ablation_arm")
REPORTED = {"run": True, "trial": False, "best": True, "export": True, "ablation_arm": True}
METRIC_TOLERANCE = 1e-6


@dataclass
class LoggedConfig:
    """What a logged run evaluated, as a configuration to re-compute."""

    run_id: str  # the run the figures belong to (and are logged to)
    kind: str  # one of RUN_KINDS
    config: TopoCAMConfig
    report_test: bool
    logged: dict[str, float]  # what was logged for this configuration: "val_auc", "test_auc", ...
    data_fingerprint: str | None = None
    note: str = ""  # e.g. "parent run: explained with its first seed 0"
    spec: Any = None  # a study's run: its StudySpec (whose published model the figures must use)
    trial_attrs: dict[str, str] = field(default_factory=dict)  # a study's run: the digests of the model it was scored on


def _run(tracker, run_id: str):
    try:
        return tracker.get_run(run_id)
    except Exception as exc:  # MlflowException (RESOURCE_DOES_NOT_EXIST), bad id format
        msg = (str(getattr(exc, "message", "") or exc).splitlines() or [type(exc).__name__])[0][:200]
        raise TopoCAMError(f"no MLflow run {run_id!r} in this tracking store ({msg}); check the run id and --tracking-uri / --runs-dir") from None


def _config_value(name: str, text: str, default: Any) -> Any:
    """A ``topocam run`` parameter (``str(value)`` of a config field) back to the field's type."""
    try:
        if isinstance(default, tuple):
            value = ast.literal_eval(text)
            return tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if isinstance(default, bool):
            return text == "True"
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return None if text == "None" else text
    except (ValueError, SyntaxError):
        raise TopoCAMError(f"logged parameter {name} = {text!r} is not a valid {type(default).__name__}") from None


def config_from_params(params: dict[str, str], **overrides: Any) -> TopoCAMConfig:
    """The :class:`TopoCAMConfig` a ``topocam run`` parent logged (unknown keys ignored)."""
    defaults = TopoCAMConfig()
    values = {
        f.name: _config_value(f.name, params[f.name], getattr(defaults, f.name))
        for f in dataclasses.fields(TopoCAMConfig) if f.name in params
    }
    return replace(defaults, **{**values, **overrides}).validated()


def _run_metrics(metrics: dict[str, float], method: str) -> dict[str, float]:
    return {k[len(method) + 1:]: v for k, v in metrics.items() if k.startswith(f"{method}_") and "_pred_" not in k}


def _from_topocam_run(tracker, run, data_dir: str | None, cache_dir: str | None) -> LoggedConfig:
    tags = run.data.tags
    parent_id = tags.get("mlflow.parentRunId")
    note = ""
    if parent_id:  # a seed's run
        parent = _run(tracker, parent_id)
        seed, child = int(tags["seed"]), run
    else:
        parent = run
        seeds = ast.literal_eval(run.data.params.get("seeds", "[0]"))
        seed = int(seeds[0])
        found = tracker.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}' "
                                    f"and tags.seed = '{seed}'", max_results=1)
        child = found[0] if found else None
        note = f"parent run of seeds {list(seeds)}: explained with its first seed, {seed}"
    params = parent.data.params
    cfg = config_from_params(params, seed=seed, data_dir=data_dir, cache_dir=cache_dir)
    logged = _run_metrics(child.data.metrics, cfg.method) if child is not None else {}
    if cfg.cam_target != "predicted":
        note = "; ".join(filter(None, [note, "LEAKAGE AUDIT run: its CAMs target the true label, not a valid result"]))
    return LoggedConfig(run.info.run_id, "run", cfg, True, logged, params.get("data_fingerprint"), note)


def _study_file(tracker, sampler_run_id: str, folder: Path) -> Path:
    try:
        files = [f.path for f in tracker.list_artifacts(sampler_run_id, "study") if f.path.endswith(".toml")]
    except Exception:  # an artifact store that cannot be read
        files = []
    if not files:
        raise TopoCAMError(f"sampler run {sampler_run_id} has no study file (artifact study/*.toml): cannot rebuild the trial's base configuration")
    return Path(tracker.download_artifacts(sampler_run_id, files[0], str(folder)))


def _param_value(name: str, text: str, spec) -> Any:
    p = spec.space.get(name)
    if p is None:
        raise TopoCAMError(f"logged parameter {name!r} is not in study {spec.name!r}'s search space")
    if p.kind == "fixed":
        return p.value
    if p.kind == "int":
        return int(float(text))
    if p.kind == "float":
        return float(text)
    by_text = {str(c): c for c in p.choices}
    if text not in by_text:
        raise TopoCAMError(f"logged parameter {name} = {text!r} is not one of {list(p.choices)}")
    return by_text[text]


def _from_study_run(tracker, run, kind: str, data_dir: str | None, cache_dir: str | None) -> LoggedConfig:
    from ..search.space import apply_params
    from ..search.studyfile import load_study

    tags = run.data.tags
    parent_id = tags.get("mlflow.parentRunId")
    if not parent_id:
        raise TopoCAMError(f"{kind} run {run.info.run_id} has no parent sampler run: cannot find its study file")
    with tempfile.TemporaryDirectory(prefix="topocam-explain-") as tmp:
        spec = load_study(_study_file(tracker, parent_id, Path(tmp)), data_dir=data_dir)
    arm = tags.get("arm", "topocam")
    if arm != "topocam":
        from ..search.space import arm_space

        spec = replace(spec, base=replace(spec.base, method=arm), space=arm_space(spec.space, arm))
    params = {k: _param_value(k, v, spec) for k, v in run.data.params.items()}
    base = replace(spec.base, cache_dir=cache_dir) if cache_dir else spec.base
    cfg = apply_params(base, params).validated()
    m = run.data.metrics
    logged = {k: v for k, v in m.items() if k.startswith(("val_", "test_"))}
    fingerprint = _run(tracker, parent_id).data.tags.get("data_fingerprint")
    note = "" if fingerprint else (
        f"warning: study {spec.name!r} records no dataset fingerprint (run before topocam recorded one): "
        f"cannot check that the data are those its {kind} run was scored on")
    digests = {k: tags[k] for k in ("backbone_sha256", "cam_sha256") if k in tags}
    return LoggedConfig(run.info.run_id, kind, cfg, REPORTED[kind], logged, fingerprint, note, spec, digests)


def logged_config(tracker, run_id: str, data_dir: str | None = None, cache_dir: str | None = None) -> LoggedConfig:
    """The configuration a ``topocam run`` run or a study's trial / best / export run evaluated.

    ``tracker``: a :class:`~topocam.tracking.Tracker` (what it calls, ``get_run``,
    ``search_runs``, ``list_artifacts`` and ``download_artifacts``, an ``MlflowClient`` has too)."""
    run = _run(tracker, run_id)
    kind = run.data.tags.get("kind")
    if kind == "run":
        return _from_topocam_run(tracker, run, data_dir, cache_dir)
    if kind in ("trial", "best", "export"):
        return _from_study_run(tracker, run, kind, data_dir, cache_dir)
    if kind == "ablation_arm" and "seed" in run.data.tags:  # `topocam ablate`: the arm's whole configuration is logged
        cfg = config_from_params(run.data.params, seed=int(run.data.tags["seed"]), data_dir=data_dir, cache_dir=cache_dir)
        if run.data.params.get("arm.method") == "cnn":
            raise TopoCAMError(f"run {run_id} is the CNN-alone arm of an ablation: it has no ROI or Betti features to explain")
        note = "LEAKAGE AUDIT arm: not a valid result" if run.data.tags.get("leakage_audit") == "true" else ""
        logged = {k: v for k, v in run.data.metrics.items() if k.startswith(("val_", "test_"))}
        return LoggedConfig(run.info.run_id, kind, cfg, True, logged, note=note)
    raise TopoCAMError(
        f"run {run_id} is a kind={kind or '?'} run; explain works on kind={', kind='.join(RUN_KINDS)} runs "
        "(a `topocam run` run, or a study's trial / best / export run)"
    )


@dataclass
class ExplainResult:
    logged: LoggedConfig
    files: list[Path]
    artifacts: list[str]  # artifact paths in the run (empty when not logged)
    metrics: dict[str, dict[str, float]]  # re-computed, per split
    mismatches: list[str] = field(default_factory=list)  # re-computed vs logged metrics that differ
    degenerate: str | None = None  # the backbone health message, if degenerate
    roi_quality: list[dict[str, Any]] | None = None


def compare_metrics(recomputed: dict[str, dict[str, float]], logged: dict[str, float], tol: float = METRIC_TOLERANCE) -> list[str]:
    out = []
    for split, metrics in recomputed.items():
        for name, value in (metrics or {}).items():
            key = f"{split}_{name}"
            if key in logged and not (math.isnan(value) and math.isnan(logged[key])) and abs(value - logged[key]) > tol:
                out.append(f"{key}: re-computed {value:.6g}, logged {logged[key]:.6g}")
    return out


def explain_run(
    tracker, run_id: str, out: Path, data_dir: str | None = None, cache_dir: str | None = None, log: bool = True,
    progress: bool = True, storage_url: str | None = None,
) -> ExplainResult:
    """Re-compute a logged run's configuration, draw its figures, write them to ``out``
    and (``log``) log them to the run under ``figures/``, through ``tracker`` (a
    :class:`~topocam.tracking.Tracker`: :func:`logged_config`'s reads, ``log_figure``, ``log_text``).
    A study's run is re-computed on the study's published model where ``storage_url`` records one
    (fetched and verified, as a worker does), and its backbone must be the one the run recorded."""
    from ..search.artifacts import check_trial_model, fetch_published
    from ..tracking import figures
    from ..core.pipeline import load_data, prepare

    lc = logged_config(tracker, run_id, data_dir, cache_dir)
    data = load_data(lc.config)
    if lc.data_fingerprint and data.fingerprint != lc.data_fingerprint:  # before anything trains
        raise TopoCAMError(
            f"{data.source} has content fingerprint {data.fingerprint}, but run {run_id} was scored on data with "
            f"fingerprint {lc.data_fingerprint}: the data changed since it ran; restore them (or check --data-dir)"
        )
    model = None
    if lc.spec is not None and storage_url is not None:  # the study's model, where published: never one of our own
        model = fetch_published(lc.spec, data, storage_url, tracker, print if progress else (lambda _: None), lc.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateBackboneWarning)  # reported in the result instead
        ctx = prepare(lc.config, progress=progress, data=data)
    check_trial_model(model, lc.trial_attrs, f"{lc.kind} run {run_id}")
    figs = figures.explain(ctx, lc.config, report_test=lc.report_test)
    files = figures.save_figures(figs, out)
    artifacts = figures.log_figures(tracker, run_id, figs) if log else []
    health = ctx.health()
    return ExplainResult(lc, files, artifacts, figs.metrics, compare_metrics(
        {s: m for s, m in figs.metrics.items() if s in ("val", "test")}, lc.logged), health.message,
        figs.tables.get("roi_quality"))
