"""Running, resuming, comparing and inspecting studies (Optuna + MLflow around the core).

One Optuna study per (study, sampler, seed), named ``<study>.<sampler>.s<seed>``
in the given storage (default: SQLite under the runs folder). The backbone and
CAM cache are built once (``pipeline.prepare``); a trial only fuses,
thresholds, computes Betti curves and fits the MLP, on train and val. Test
metrics are computed for the best trial of each (sampler, seed) only, after
the search, and never feed back into it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna

from ..errors import TopoCAMError
from ..pipeline import Context, evaluate, fit_and_score, original_features, prepare
from ..metrics import evaluate as score
from ..tracking import DEFAULT_RUNS_DIR, Tracker, flat_metrics
from .samplers import SAMPLERS, make_sampler
from .space import apply_params, suggest
from .studyfile import StudySpec

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)


def default_storage(runs_dir: Path = DEFAULT_RUNS_DIR) -> str:
    return f"sqlite:///{Path(runs_dir).resolve() / 'optuna.db'}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL, or a clear error within seconds."""
    try:
        if url.startswith("sqlite:///"):
            folder = Path(url.removeprefix("sqlite:///")).parent
            if not folder.is_dir():
                raise TopoCAMError(f"storage {url!r}: folder {folder} does not exist; create it or choose another --storage")
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 60}}, heartbeat_interval=60, grace_period=180
            )
        if url.startswith(("postgresql", "mysql")):
            key = "connect_timeout"
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {key: 5}, "pool_pre_ping": True}, heartbeat_interval=60, grace_period=180
            )
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            path = Path(url.removeprefix("journal:"))
            if not path.parent.is_dir():
                raise TopoCAMError(f"storage {url!r}: folder {path.parent} does not exist")
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except TopoCAMError:
        raise
    except Exception as exc:  # sqlalchemy/driver errors: all mean "cannot open this storage"
        msg = str(exc).splitlines()[0][:300]
        raise TopoCAMError(f"cannot open Optuna storage {url!r} ({type(exc).__name__}: {msg})") from None
    raise TopoCAMError(
        f"unsupported storage URL {url!r}; use sqlite:///path.db, postgresql://user:pw@host/db, mysql://... or journal:/path.log"
    )


def optuna_name(spec: StudySpec, sampler: str, seed: int) -> str:
    return f"{spec.name}.{sampler}.s{seed}"


@dataclass
class SamplerRun:
    sampler: str
    seed: int
    values: list[float]  # objective per finished trial in trial order (NaN for failed)
    durations_s: list[float]
    best_value: float
    best_params: dict[str, Any]
    best_trial: int
    test: dict[str, float] | None
    val: dict[str, float] | None
    n_failed: int
    run_id: str | None = None

    def best_so_far(self) -> np.ndarray:
        v = np.array([x if math.isfinite(x) else -np.inf for x in self.values], dtype=float)
        return np.maximum.accumulate(v) if v.size else v


@dataclass
class StudyRunner:
    """Runs a study's samplers on one shared context (backbone + CAM cache)."""

    spec: StudySpec
    storage_url: str
    tracker: Tracker | None
    progress: bool = True
    runs_dir: Path = DEFAULT_RUNS_DIR
    _ctx: Context | None = None
    _storage: Any = None
    _exp: str | None = None
    log: Callable[[str], None] = print
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def storage(self):
        if self._storage is None:
            self._storage = open_storage(self.storage_url)
        return self._storage

    @property
    def ctx(self) -> Context:
        if self._ctx is None:
            t0 = time.perf_counter()
            self._ctx = prepare(self.spec.base, progress=self.progress)
            self.timings_s["prepare"] = time.perf_counter() - t0
        return self._ctx

    @property
    def experiment(self) -> str | None:
        if self.tracker is not None and self._exp is None:
            self._exp = self.tracker.experiment(self.spec.name)
        return self._exp

    def _tags(self, **extra) -> dict[str, Any]:
        return {"study": self.spec.name, "dataset": self.spec.base.dataset, **extra}

    # ------------------------------------------------------------ baselines
    def log_baselines(self) -> dict[str, dict]:
        """CNN and Topo-Original, once per study (skipped if already logged)."""
        ctx = self.ctx
        cfg = self.spec.base
        out: dict[str, dict] = {}
        for name in ("cnn", "topo_original"):
            if self.tracker is not None and self.tracker.find_run(self.experiment, {"kind": "baseline", "baseline": name, "study": self.spec.name}):
                continue
            if name == "cnn":
                res = {s: score(ctx.data.y[s], ctx.cnn_probs[s], ctx.data.task) for s in ("val", "test")}
            else:
                fit = fit_and_score(ctx, cfg, original_features(ctx, cfg, report_test=True), report_test=True)
                res = {"val": fit.val, "test": fit.test}
            out[name] = res
            if self.tracker is not None:
                rid = self.tracker.start_run(
                    self.experiment, f"baseline-{name}", self._tags(kind="baseline", baseline=name),
                    params={"backbone": ctx.backbone.arch, "backbone_init": ctx.backbone.init, "bins": cfg.bins, "outside": cfg.outside,
                            "mlp": cfg.mlp, "backbone_seed": cfg.seed},
                )
                self.tracker.log_metrics(rid, {**flat_metrics("val", res["val"]), **flat_metrics("test", res["test"])})
                self.tracker.finish(rid)
        return out

    # ------------------------------------------------------------ one sampler
    def _parent_run(self, sampler: str, seed: int, n_trials: int) -> str | None:
        if self.tracker is None:
            return None
        tags = self._tags(kind="sampler", sampler=sampler, seed=seed)
        rid = self.tracker.find_run(self.experiment, tags)
        if rid is None:
            base = self.spec.base
            rid = self.tracker.start_run(
                self.experiment, f"{sampler}-seed{seed}", tags,
                params={"sampler": sampler, "seed": seed, "n_trials": n_trials, "objective": self.spec.objective,
                        "backbone": base.backbone, "backbone_epochs": base.epochs, "backbone_seed": base.seed,
                        "bins": base.bins, "outside": base.outside, "betti_backend": base.betti_backend,
                        "search_space": json.dumps({k: vars(p) for k, p in self.spec.space.items()}, default=str)},
            )
            self.tracker.log_text(rid, self.spec.text, f"study/{self.spec.path.name}")
        else:
            self.tracker.client.update_run(rid, status="RUNNING")
        return rid

    def _objective(self, parent: str | None, sampler: str, seed: int):
        ctx = self.ctx
        spec = self.spec

        def objective(trial: optuna.Trial) -> float:
            t0 = time.perf_counter()
            params = suggest(trial, spec.space)
            rid = None
            if self.tracker is not None:
                rid = self.tracker.start_run(
                    self.experiment, f"{sampler}-s{seed}-t{trial.number}",
                    self._tags(kind="trial", sampler=sampler, seed=seed, trial=trial.number), parent=parent, params=params,
                )
            try:
                cfg = apply_params(spec.base, params)
                out = evaluate(ctx, cfg, report_test=False)
            except Exception as exc:
                if rid is not None:
                    self.tracker.set_tags(rid, {"error": f"{type(exc).__name__}: {exc}"[:5000]})
                    self.tracker.log_metrics(rid, {"duration_s": time.perf_counter() - t0})
                    self.tracker.finish(rid, "FAILED")
                raise
            value = out.val[spec.metric]
            duration = time.perf_counter() - t0
            for k, v in out.val.items():
                trial.set_user_attr(f"val_{k}", v)
            trial.set_user_attr("duration_s", duration)
            if rid is not None:
                self.tracker.log_metrics(rid, {**flat_metrics("val", out.val), "duration_s": duration,
                                               **{f"time_{k}_s": v for k, v in out.timings_s.items()},
                                               "roi_fraction_train": out.features.roi_fraction["train"]})
                self.tracker.finish(rid, "FINISHED" if math.isfinite(value) else "FAILED")
            return value

        return objective

    def run(self, sampler: str, seed: int, n_trials: int | None = None) -> SamplerRun:
        """Run (or resume) one (sampler, seed) up to the budget; return its history."""
        if sampler not in SAMPLERS:
            raise TopoCAMError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
        n_trials = n_trials or self.spec.n_trials
        study = optuna.create_study(
            study_name=optuna_name(self.spec, sampler, seed), storage=self.storage, load_if_exists=True,
            sampler=make_sampler(sampler, seed, self.spec.sampler_options.get(sampler)), direction="maximize",
        )
        for k, v in {"topocam_study": self.spec.name, "sampler": sampler, "seed": seed, "objective": self.spec.objective}.items():
            study.set_user_attr(k, v)
        optuna.storages.fail_stale_trials(study)
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        parent = self._parent_run(sampler, seed, n_trials)
        remaining = max(0, n_trials - done)
        if remaining:
            _ = self.ctx  # build backbone and data before the trial bar starts
            bar = _TrialBar(n_trials, done, f"{sampler} seed {seed}", self.progress, study)
            study.optimize(
                self._objective(parent, sampler, seed), n_trials=remaining, catch=(Exception,),
                callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=FINISHED), bar],
            )
            bar.close()
        result = self._summarise(study, sampler, seed, parent)
        if parent is not None:
            self._log_sampler_artifacts(study, parent, result)
            self.tracker.finish(parent)
        return result

    def _summarise(self, study: optuna.Study, sampler: str, seed: int, parent: str | None) -> SamplerRun:
        trials = sorted(study.get_trials(deepcopy=False, states=FINISHED), key=lambda t: t.number)
        values = [float(t.value) if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None else float("nan") for t in trials]
        durations = [float(t.user_attrs.get("duration_s", (t.duration.total_seconds() if t.duration else float("nan")))) for t in trials]
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
        n_failed = len(trials) - len(complete)
        if not complete:
            return SamplerRun(sampler, seed, values, durations, float("nan"), {}, -1, None, None, n_failed, parent)
        best = max(complete, key=lambda t: (t.value, -t.number))
        val, test = self._best_test(best, sampler, seed, parent)
        return SamplerRun(sampler, seed, values, durations, float(best.value), dict(best.params), best.number, test, val, n_failed, parent)

    def _best_test(self, best: optuna.trial.FrozenTrial, sampler: str, seed: int, parent: str | None):
        """Test metrics of the chosen configuration: computed after the choice, logged once."""
        params = {**{k: p.value for k, p in self.spec.space.items() if p.kind == "fixed"}, **best.params}
        if self.tracker is not None:
            rid = self.tracker.find_run(self.experiment, self._tags(kind="best", sampler=sampler, seed=seed, trial=best.number))
            if rid is not None:
                run = self.tracker.client.get_run(rid)
                m = run.data.metrics
                return ({k[4:]: v for k, v in m.items() if k.startswith("val_")}, {k[5:]: v for k, v in m.items() if k.startswith("test_")})
        out = evaluate(self.ctx, apply_params(self.spec.base, params), report_test=True)
        if self.tracker is not None:
            rid = self.tracker.start_run(
                self.experiment, f"{sampler}-s{seed}-best", self._tags(kind="best", sampler=sampler, seed=seed, trial=best.number),
                parent=parent, params=params,
            )
            self.tracker.log_metrics(rid, {**flat_metrics("val", out.val), **flat_metrics("test", out.test)})
            self.tracker.finish(rid)
            self.tracker.log_metrics(parent, {"best_val_" + self.spec.metric: best.value, **flat_metrics("best_test", out.test)})
        return out.val, out.test

    def _log_sampler_artifacts(self, study: optuna.Study, run_id: str, result: SamplerRun) -> None:
        from .plots import study_plots

        folder = self.runs_dir.resolve() / "tmp" / f"{study.study_name}-{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            for path in study_plots(study, folder):
                self.tracker.log_artifact(run_id, path, "plots")
            df = study.trials_dataframe()
            hist = folder / "history.csv"
            df.to_csv(hist, index=False)
            self.tracker.log_artifact(run_id, hist, "history")
        finally:
            for p in folder.glob("*"):
                p.unlink()
            folder.rmdir()


class _TrialBar:
    """tqdm bar over the budget with the best value so far (ETA from tqdm)."""

    def __init__(self, total: int, done: int, desc: str, enabled: bool, study: optuna.Study):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, desc=desc, unit="trial", disable=not enabled, leave=True)
        try:
            self.bar.set_postfix(best=f"{study.best_value:.4f}")
        except ValueError:
            pass  # no completed trial yet: nothing to show

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.bar.update(1)
        try:
            self.bar.set_postfix(best=f"{study.best_value:.4f}", failed=sum(t.state == optuna.trial.TrialState.FAIL for t in study.get_trials(deepcopy=False)))
        except ValueError:
            pass  # every trial so far failed: no best value

    def close(self) -> None:
        self.bar.close()


def study_status(name: str, storage_url: str) -> list[dict[str, Any]]:
    """One row per (sampler, seed) study of ``name``: trial counts and best value."""
    storage = open_storage(storage_url)
    names = optuna.get_all_study_names(storage)
    mine = sorted(n for n in names if n == name or n.startswith(name + "."))
    if not mine:
        known = sorted({n.split(".")[0] for n in names})
        raise TopoCAMError(f"no study named {name!r} in {storage_url}; studies there: {', '.join(known) or 'none'}")
    return [_status_row(optuna.load_study(study_name=n, storage=storage)) for n in mine]


def _status_row(study: optuna.Study) -> dict[str, Any]:
    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    count = {st: sum(t.state == st for t in trials) for st in (S.COMPLETE, S.RUNNING, S.FAIL, S.PRUNED, S.WAITING)}
    try:
        best, best_n = study.best_value, study.best_trial.number
    except ValueError:
        best, best_n = float("nan"), -1
    return {"study": study.study_name, "complete": count[S.COMPLETE], "running": count[S.RUNNING],
            "failed": count[S.FAIL], "pruned": count[S.PRUNED], "best_value": best, "best_trial": best_n}
