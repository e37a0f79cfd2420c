"""What a report reads, as plain data: the study files, the comparison and ablation tables
(``RUNS_DIR/compare/STUDY/comparison.json``, ``RUNS_DIR/ablate/STUDY-SUITE/ablation.json``), the
Optuna trials and the figures logged in MLflow. Nothing is trained or re-computed here; a missing
input is recorded with the command that produces it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ..core.stats import mean_sd
from ..search.studyfile import StudySpec

METHODS = ("cnn", "topo_original", "topocam", "hybrid")
METHOD_LABELS = {"cnn": "CNN", "topo_original": "Topo-Original", "topocam": "TopoCAM", "hybrid": "Hybrid head"}
FIGURES = ("betti_curves", "cam_overlays")  # of the best configuration, as explain and ablate log them


@dataclass
class Cell:
    """One method on one study's test split: {"auc": {mean, sd, n[, ci95]}, "acc": ...}."""

    metrics: dict[str, dict]
    note: str = ""  # e.g. "tuned: its best val_auc ... is trial 41 of ..."


@dataclass
class Headline:
    source: str  # "ablation" (paired intervals) or "comparison" (no intervals)
    cells: dict[str, Cell]
    # TopoCAM minus the other method on the study's metric, paired over the same test images
    differences: dict[str, dict] = field(default_factory=dict)


@dataclass
class StudyData:
    spec: StudySpec
    digest: str
    compare_path: Path
    comparison: dict | None = None
    ablations: dict[str, dict] = field(default_factory=dict)  # suite -> ablation.json
    ablation_paths: dict[str, Path] = field(default_factory=dict)
    trials: list[dict] = field(default_factory=list)  # TopoCAM trials: sampler, seed, number, value, params
    figures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG
    figures_from: str = ""  # the run they were logged to
    missing: dict[str, str] = field(default_factory=dict)  # input -> the command that produces it
    trials_error: str = ""  # why the storage could not be read
    headline: Headline | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def metric(self) -> str:
        return self.spec.metric


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_references() -> dict[str, list[dict]]:
    """The published numbers and claims shipped with the package (``references.toml``):
    ``{"reference": [...], "claim": [...]}``."""
    doc = tomllib.loads(resources.files("topocam.report").joinpath("references.toml").read_text())
    return {"reference": list(doc.get("reference", [])), "claim": list(doc.get("claim", []))}


def references_for(refs: dict[str, list[dict]], dataset: str) -> list[dict]:
    """The published numbers for a dataset, at whatever input size they were measured (each says its size)."""
    return [r for r in refs["reference"] if r.get("dataset") == dataset]


def claims_for(refs: dict[str, list[dict]], dataset: str) -> dict[str, dict]:
    return {c["claim"]: c for c in refs["claim"] if c.get("dataset") == dataset}


# -------------------------------------------------------------------- the tables


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def headline_from_ablation(ab: dict, metric: str) -> Headline:
    """Cells from an ablation suite run: TopoCAM is the reference, the CNN, Topo-Original and the
    hybrid head are its arms under the same model seeds; TopoCAM - other is minus the arm's Δ, and
    its interval is the arm's paired bootstrap interval (``search/ablate.summarise``) negated."""
    cells: dict[str, Cell] = {}
    diffs: dict[str, dict] = {}
    for row in ab.get("rows", []):
        if row.get("status") != "ok" or not row.get("valid", True) or row.get("report") != "test":
            continue
        s = row.get("settings", {})
        if row["ablation"] == "reference":
            method = "topocam"
        elif s == {"method": "cnn"}:
            method = "cnn"
        elif s == {"method": "topo_original"}:
            method = "topo_original"
        elif s == {"head": "hybrid"}:
            method = "hybrid"
        else:
            continue
        if method in cells:
            continue
        cells[method] = Cell({m: row[m] for m in ("auc", "acc") if m in row}, row.get("source", ""))
        d = row.get(f"delta_{metric}")
        if method != "topocam" and d and d.get("n"):
            lo, hi = d["ci95"]
            diffs[method] = {"mean": -d["mean"], "ci95": [-hi if hi is not None else math.nan, -lo if lo is not None else math.nan],
                             "n": d["n"]}
    return Headline("ablation", cells, diffs)


def headline_from_comparison(cmp: dict) -> Headline | None:
    """Cells from a comparison's replication (every (sampler, sampler seed)'s best configuration under
    every model seed; the CNN under the same model seeds). No paired interval: the comparison keeps
    no per-image predictions."""
    rep = cmp.get("replication")
    if not rep:
        return None

    def pooled(per_run: dict) -> dict:
        return {m: mean_sd([res["test"].get(m, math.nan) for reps in per_run.values() for res in reps.values()])
                for m in ("auc", "acc")}

    cells = {"topocam": Cell(pooled(rep["per_run"]), "pooled over every sampler's chosen configurations")}
    cnn = rep.get("baselines_per_seed", {}).get("cnn")
    if cnn:
        cells["cnn"] = Cell({m: mean_sd([v.get(m, math.nan) for v in cnn.values()]) for m in ("auc", "acc")})
    orig = (cmp.get("equal_budget") or {}).get("topo_original_replication")
    if orig:
        cells["topo_original"] = Cell(pooled(orig["per_run"]), "tuned, pooled over every sampler's chosen configurations")
    return Headline("comparison", cells)


def curves(cmp: dict) -> dict[str, np.ndarray]:
    """Best-so-far objective per sampler: (sampler seeds, budget), as ``search/compare.summarise`` builds them."""
    n = int(cmp["n_trials"])
    out: dict[str, list] = {}
    for r in cmp["runs"]:
        v = np.array([x if x is not None and math.isfinite(x) else -np.inf for x in r["values"]], dtype=float)[:n]
        b = np.maximum.accumulate(v) if v.size else v
        c = np.full(n, -np.inf)
        c[: b.size] = b
        if 0 < b.size < n:
            c[b.size :] = b[-1]
        out.setdefault(r["sampler"], []).append(c)
    return {s: np.array(c) for s, c in out.items()}


# ----------------------------------------------------------------------- stores


def study_trials(storage_url: str, name: str) -> list[dict]:
    """Completed TopoCAM trials of every sampler study of ``name`` in the storage (read only)."""
    import optuna

    from ..search.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_url, read_only=True)
    out = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        a = s.user_attrs
        if a.get("topocam_study") != name or a.get("arm", "topocam") != "topocam":
            continue
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.value is not None and math.isfinite(t.value):
                out.append({"sampler": a.get("sampler"), "seed": a.get("seed"), "number": t.number, "value": float(t.value),
                            "params": dict(t.params), "distributions": dict(t.distributions)})
    return out


def logged_figures(tracker, name: str, tmp: Path) -> tuple[dict[str, bytes], str]:
    """The best configuration's Betti curves and CAM overlays as logged: the ablation reference's
    (``topocam ablate`` logs them to its best seed's run), else a study run ``topocam explain`` logged
    them to (the newest ``kind=best``)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar per figure in the report's output
    places = [(f"{name}-ablate", "tags.kind = 'ablation_arm' and tags.ablation = 'reference'"),
              (name, "tags.kind = 'best'")]
    for exp_name, flt in places:
        exp = tracker.find_experiment(exp_name)
        if exp is None:
            continue
        for run in tracker.search_runs([exp], flt, order_by=["attributes.start_time DESC"]):
            try:
                have = {Path(a.path).stem: a.path for a in tracker.list_artifacts(run.info.run_id, "figures")}
            except Exception:  # an artifact store that cannot be listed: look further
                continue
            if all(f in have for f in FIGURES):
                out = {}
                for f in FIGURES:
                    local = tracker.download_artifacts(run.info.run_id, have[f], str(tmp))
                    out[f] = Path(local).read_bytes()
                return out, f"run {run.info.run_id} ({run.data.tags.get('mlflow.runName', '')}) of experiment {exp_name!r}"
    return {}, ""


def gather(specs: list[StudySpec], storage_url: str, tracker, runs_dir: Path, ablations: bool, suite: str,
           tmp: Path, data_dir: str | None = None) -> list[StudyData]:
    out = []
    for spec in specs:
        d = StudyData(spec, sha256(spec.path), runs_dir / "compare" / spec.name / "comparison.json")
        data = f" --data-dir {data_dir}" if data_dir else ""
        d.comparison = _read_json(d.compare_path)
        if d.comparison is None:
            d.missing["comparison"] = f"topocam study compare {spec.path}{data}"
        path = runs_dir / "ablate" / f"{spec.name}-{suite}" / "ablation.json"
        ab = _read_json(path)
        if ab is not None:
            d.ablations[suite], d.ablation_paths[suite] = ab, path
        elif ablations or suite:
            d.missing["ablation"] = f"topocam ablate {spec.path} --suite {suite}{data}"
        if suite in d.ablations:
            d.headline = headline_from_ablation(d.ablations[suite], spec.metric)
        if (d.headline is None or not d.headline.cells) and d.comparison is not None:
            d.headline = headline_from_comparison(d.comparison)
        try:
            d.trials = study_trials(storage_url, spec.name)
        except Exception as exc:  # no storage yet, or unreadable: the section says what to run
            d.trials_error = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            d.missing["trials"] = f"topocam study compare {spec.path}{data}"
        if not d.trials and "trials" not in d.missing:
            d.missing["trials"] = f"topocam study compare {spec.path}{data}"
        if tracker is not None:
            d.figures, d.figures_from = logged_figures(tracker, spec.name, tmp)
        if not d.figures:
            d.missing["figures"] = f"topocam ablate {spec.path} --suite {suite}{data}"  # logs the reference's figures
        out.append(d)
    return out
