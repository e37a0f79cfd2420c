"""``topocam export``: the best trial of a study as a registered MLflow model.

1. **Choose.** Among the study's Optuna studies (``<study>.<sampler>.s<seed>``
   in the storage; all of them, or the sampler / seed named), the completed
   trial with the best objective (a validation metric). Ties go to the lower
   trial number, then to the first (sampler, seed) in name order. Test metrics
   take no part in the choice. ``trial=K`` names a trial instead.
2. **Refit.** The study's data must have the content fingerprint the Optuna
   study recorded (checked before anything trains; a study from before it was
   recorded is said in one warning line). The study's published model is fetched
   and verified (``search.artifacts``), and the backbone must be the one the
   chosen trial recorded (``backbone_sha256``), or nothing is registered. Its configuration
   (``space.apply_params`` over the study's base) is evaluated on the study's
   context (``pipeline.prepare``: the same cached backbone and CAMs): the MLP is
   fitted on the training split, the Betti grid is the train-fitted one. Its
   validation metrics must equal the search's to ``REFIT_ATOL``, or nothing is
   logged. Validation and test metrics are recorded as provenance.
3. **Check.** The bundle is written, read back, and applied to the validation
   images through the exported code path; its probabilities must equal the
   pipeline's (to 1e-6), or nothing is logged.
4. **Log and register.** One pyfunc model (models-from-code, ``model_code.py``;
   the bundle as its artifact), with a signature, a synthetic input example and
   the provenance, logged in the study's ``kind=best`` MLflow run of that
   (sampler, seed) when the trial is that run's (otherwise in a new
   ``kind=export`` run), registered as a new version of NAME, and given the
   alias ``champion``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..core.errors import TopoCAMError
from ..core.pipeline import check_predictable, evaluate, load_data, prepare
from ..search.artifacts import check_trial_model, fetch_published
from ..search.choose import Choice, choose_trial
from ..search.fingerprint import check_data
from ..stores import redact_url
from .bundle import Bundle
from .inputs import InputSpec

ALIAS = "champion"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")
MODEL_CODE = Path(__file__).with_name("model_code.py")
SELF_CHECK_ATOL = 1e-6
REFIT_ATOL = 1e-6  # absolute: a refit's validation metrics (the objective among them) must equal the search's to this


@dataclass
class ExportResult:
    name: str
    version: int
    model_uri: str  # models:/NAME/VERSION
    alias_uri: str  # models:/NAME@champion
    run_id: str
    model_id: str | None
    tracking_uri: str
    choice: Choice
    val: dict[str, float]
    test: dict[str, float]
    provenance: dict[str, Any]
    reference: dict[str, np.ndarray] = field(default_factory=dict)  # split -> pipeline probabilities at export


def check_model_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name or ""):
        raise TopoCAMError(
            f"model name {name!r} must start with a letter or digit and hold only letters, digits, '_', '-' and '.' (at most 100)"
        )
    return name

# ---------------------------------------------------------------------- refit


def example_input(spec: InputSpec) -> np.ndarray:
    """A synthetic uint8 image (a soft bright disc), never a patient's: the model's input example."""
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, s) for s in spec.shape], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grids))
    img = (20 + 200 * np.clip(1.2 - 1.5 * r, 0.0, 1.0)).astype(np.uint8)[None]
    return np.repeat(img[..., None], 3, axis=-1) if spec.channels == 3 else img


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def check_refit(spec, choice: Choice, val: dict[str, float]) -> None:
    """The refit scores validation as the search did: each validation metric the trial recorded
    (the objective itself when it is a validation one) within ``REFIT_ATOL``, else an error."""
    search = dict(choice.val)  # the trial's val_* attributes
    if not spec.cv_folds:
        search[spec.metric] = choice.value  # the objective, as the search stored it
    off = [f"{k.upper()} {val[k]:.6f} (search: {v:.6f})" for k, v in sorted(search.items(), key=lambda kv: (kv[0] != spec.metric, kv[0]))
           if k in val and not (math.isnan(val[k]) and math.isnan(v)) and not abs(val[k] - v) <= REFIT_ATOL]
    if off:
        raise TopoCAMError(
            f"the refit of {choice.optuna_study} trial {choice.trial} scores validation {', '.join(off)}, beyond the "
            f"tolerance {REFIT_ATOL:g}: it is not the model the search scored (backbone or CAM cache rebuilt on other "
            "hardware or library versions?); nothing was registered: export where the study ran, with its cache, or run the study again here"
        )


def refit(spec, choice: Choice, progress: bool = True, log: Callable[[str], None] = print, data=None,
          check_model: Callable[[], None] | None = None):
    """Rebuild the chosen configuration on the study's context and fit it on train; its
    validation metrics must be the search's (:func:`check_refit`). ``data``: the study's
    dataset, when already loaded (and checked). Returns the bundle, the outcome (val and
    test metrics), the pipeline's probabilities per split (val, test) and the context.
    ``check_model``, called once the backbone is loaded, may refuse it
    (:func:`~topocam.search.artifacts.check_trial_model`)."""
    from ..search.space import apply_params

    cfg = check_predictable(apply_params(spec.base, choice.params).validated())  # before anything trains
    ctx = prepare(spec.base, progress=progress, data=data)
    if check_model is not None:
        check_model()
    out = evaluate(ctx, cfg, report_test=True, progress=progress)
    check_refit(spec, choice, out.val)
    ds = ctx.data
    names = list(ds.class_names) if len(ds.class_names) == ds.n_classes else [str(i) for i in range(ds.n_classes)]
    bb = ctx.backbone
    provenance = {
        "study": spec.name, "study_file": str(spec.path), "study_definition_sha": choice.definition_sha,
        "sampler": choice.sampler, "seed": choice.seed, "trial": choice.trial, "optuna_study": choice.optuna_study,
        "selection": choice.how, "objective": spec.objective, "objective_at_search": choice.value,
        "params": choice.params,
        "val": out.val, "test": out.test,
        "test_note": "test metrics are provenance only: computed after the choice, never used to make it",
        "dataset": {"name": ds.name, "fingerprint": ds.fingerprint, "task": ds.task, "n_classes": ds.n_classes,
                    "shape": list(ds.shape), "channels": ds.n_channels, "n": {s: int(len(ds.y[s])) for s in ds.y}},
        "backbone": {"arch": bb.arch, "init": bb.init, "best_epoch": bb.best_epoch, "best_val_auc": bb.best_val_auc,
                     "cache_key": bb.cache_key, "settings": bb.settings},
        "roi_fraction": out.features.roi_fraction,
        "topocam_version": __version__, "git_commit": _git_commit(),
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    bundle = Bundle(ctx.model.cpu().eval(), cfg, out.features.grid, out.model, InputSpec(ds.shape, ds.n_channels),
                    names, provenance, getattr(ds, "preprocessing", None))
    reference = {s: out.model.predict_proba(out.features.x[s]) for s in ("val", "test")}
    return bundle, out, reference, ctx


def self_check(folder: Path, x_val: np.ndarray, reference: np.ndarray) -> float:
    """The written bundle, read back, must give the pipeline's validation probabilities."""
    again = Bundle.load(folder)
    got = again.predict(x_val).probs
    diff = float(np.max(np.abs(got - reference))) if reference.size else 0.0
    if not diff <= SELF_CHECK_ATOL:
        raise TopoCAMError(
            f"the exported bundle does not reproduce the pipeline's validation probabilities (max difference {diff:.3g}); "
            "nothing was logged"
        )
    return diff

# ------------------------------------------------------------------------ log


@contextlib.contextmanager
def _on_store(uri: str):
    """The fluent MLflow API (log_model, registration) on this store; the
    registry follows the tracking URI. Restored afterwards to "not set", not to
    the default it resolved to (which would pin later calls to ./mlflow.db)."""
    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # pragma: no cover - older/newer MLflow: leave the URI set
        import mlflow

        mlflow.set_tracking_uri(uri)
        yield
        return
    with _use_tracking_uri(uri):
        yield


def signature(bundle: Bundle):
    """Input: one tensor of any shape and dtype, validated by the model itself
    (MLflow's tensor specs fix one dtype and one rank, and its JSON parser
    casts every number to that dtype, which would erase the uint8 / float
    distinction and the optional channel axis the model accepts). Output: one
    record per image."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(object), (-1,))]),
        outputs=Schema([ColSpec(DataType.long, "class"), ColSpec(Array(DataType.double), "probabilities"),
                        ColSpec(DataType.double, "roi_fraction")]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("mlflow", "torch", "torchvision", "numpy", "scipy", "numba", "giotto-tda", "pillow", "nibabel", "matplotlib"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return out + [f"topocam=={__version__}"]  # this project: serve with --env-manager local from its environment


def target_run(tracker, spec, choice: Choice) -> str:
    """The study's ``kind=best`` run of this (sampler, seed) if it is this trial's;
    otherwise a new ``kind=export`` run under the sampler run."""
    exp = tracker.experiment(spec.name)
    tags = {"study": spec.name, "arm": "topocam", "sampler": choice.sampler, "seed": choice.seed}
    best_runs = [r for r in tracker.find_runs(exp, {**tags, "kind": "best"}) if r.data.tags.get("trial") == str(choice.trial)]
    if best_runs:
        return best_runs[0].info.run_id
    parent = tracker.find_run(exp, {**tags, "kind": "sampler"})
    run_id = tracker.start_run(exp, f"{choice.sampler}-s{choice.seed}-t{choice.trial}-export",
                               {**tags, "kind": "export", "trial": choice.trial, "dataset": spec.base.dataset},
                               parent=parent, params=choice.params)
    tracker.finish(run_id)
    return run_id


def log_and_register(bundle: Bundle, folder: Path, name: str, tracker, spec, choice: Choice,
                     run_id: str) -> tuple[int, str | None]:
    """Log the bundle as a pyfunc model in ``run_id``, register it as a new
    version of ``name`` and point the ``champion`` alias at it."""
    import mlflow

    p = bundle.provenance
    metric = spec.metric
    summary = {"study": spec.name, "sampler": choice.sampler, "seed": choice.seed, "trial": choice.trial,
               f"val_{metric}": p["val"].get(metric), f"test_{metric}": (p["test"] or {}).get(metric)}
    with _on_store(tracker.uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"bundle": str(folder)},
            signature=signature(bundle),
            input_example=example_input(bundle.input),
            registered_model_name=name,
            pip_requirements=_requirements(),
            metadata={"topocam": {"input": bundle.input.describe(), **bundle.input.as_dict(),
                                  "classes": bundle.class_names, **summary}},
            tags={k: str(v) for k, v in summary.items()},
        )
    version = int(info.registered_model_version)
    tracker.set_model_alias(name, ALIAS, version)
    tracker.set_model_version_tags(name, version, summary)
    tracker.describe_model_version(
        name, version,
        f"TopoCAM, study {spec.name}: {choice.sampler} seed {choice.seed} trial {choice.trial}; "
        f"val {metric.upper()} {_num(summary[f'val_{metric}'])}, test {metric.upper()} "
        f"{_num(summary[f'test_{metric}'])} (test: provenance only). Input: {bundle.input.describe()}.",
    )
    tracker.set_tags(run_id, {"exported_model": f"{name}/{version}"})
    return version, getattr(info, "model_id", None)


def _num(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def export(spec, name: str, storage_url: str, tracker, sampler: str | None = None, seed: int | None = None,
           trial: int | None = None, progress: bool = True, log: Callable[[str], None] = print,
           choice: Choice | None = None, data=None) -> ExportResult:
    """Choose, refit, check, log, register (see the module doc). ``choice``: the trial if already
    chosen (``choose_trial`` with these arguments); ``data``: the study's dataset if already read."""
    check_model_name(name)
    choice = choice if choice is not None else choose_trial(spec, storage_url, sampler, seed, trial)
    log(f"exporting {choice.optuna_study} trial {choice.trial} ({spec.objective} {choice.value:.4f}; {choice.how})")
    data = data if data is not None else load_data(spec.base)
    check_data(choice.attrs, choice.optuna_study, data, log)  # before anything trains
    model = fetch_published(spec, data, storage_url, tracker, log)  # the study's model, where published
    bundle, out, reference, ctx = refit(spec, choice, progress=progress, log=log, data=data,
                                        check_model=lambda: check_trial_model(model, choice.trial_attrs,
                                                                              f"{choice.optuna_study} trial {choice.trial}"))
    with tempfile.TemporaryDirectory(prefix="topocam-export-") as tmp:
        folder = bundle.save(Path(tmp) / "bundle")
        self_check(folder, ctx.data.x["val"], reference["val"])  # before anything is logged
        run_id = target_run(tracker, spec, choice)
        bundle.provenance["mlflow"] = {"tracking_uri": redact_url(tracker.uri), "experiment": spec.name, "run_id": run_id}
        bundle.save(folder)
        version, model_id = log_and_register(bundle, folder, name, tracker, spec, choice, run_id)
    return ExportResult(name, version, f"models:/{name}/{version}", f"models:/{name}@{ALIAS}", run_id, model_id,
                        tracker.uri, choice, out.val, out.test or {}, bundle.provenance, reference)
