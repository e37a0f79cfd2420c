"""The MLflow runs of a study: which runs exist, their names, tags and what each logs.

One experiment per study (the study's name); in it:

* ``kind=baseline``: the CNN and Topo-Original baselines, once per study;
* ``kind=sampler``: a parent run per (arm, sampler, seed), with its artifacts
  (study file, optimisation history, parallel-coordinate and importance plots);
* ``kind=trial``: a nested run per trial: parameters, validation metrics, duration;
* ``kind=best``: nested under its sampler run, the best trial's test metrics
  (tag ``trial``); when a resumed search finds a better trial, the earlier one
  is re-tagged ``kind=best_superseded``, so ``kind=best`` is the current choice;
* ``kind=comparison``: the sampler comparison table and plot (:mod:`.compare`).

Every run carries the tags ``study``, ``dataset``, ``arm``, ``kind`` and, where they
apply, ``sampler`` and ``seed``, so runs can be filtered in the UI; the Topo-Original
arm's run names start with ``topo_original-``. Find-or-create steps (baselines, sampler
run, best run) hold a lock (a file lock beside a local store; with a tracking server, a
lock in the Optuna storage the workers share), so workers starting or finishing together
do not log them twice.

Without a tracker (``StudyRuns(None, ...)``) nothing is logged: the calls that compute
(:meth:`StudyRuns.best_test`) only compute, the others do nothing.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from ..core.pipeline import Context, TopoCAMConfig, TrialOutcome
from ..core.locks import FileLock
from ..tracking import Tracker, flat_metrics
from .storage import DatabaseLock
from .studyfile import StudySpec

S = optuna.trial.TrialState
FINISHED = (S.COMPLETE, S.FAIL, S.PRUNED)


@dataclass(frozen=True)
class StudyRuns:
    """One arm of a study in MLflow (``tracker`` None: not tracked)."""

    tracker: Tracker | None
    experiment: str | None  # the study's experiment id
    spec: StudySpec
    arm: str
    storage_lock: Callable[[str], FileLock | DatabaseLock]  # a named lock in the Optuna storage the workers share

    def tags(self, **extra) -> dict[str, Any]:
        return {"study": self.spec.name, "dataset": self.spec.base.dataset, "arm": self.arm, **extra}

    @property
    def prefix(self) -> str:
        """Run names of the Topo-Original arm start with it; TopoCAM's keep their names."""
        return "" if self.arm == "topocam" else f"{self.arm}-"

    def lock(self) -> FileLock | DatabaseLock:
        """Serialises find-or-create of MLflow runs between workers: a file lock beside a local
        MLflow store; with a tracking server, a lock in the Optuna storage all workers share."""
        if self.tracker is None:
            return FileLock(None)
        if self.tracker.lock_path is not None:
            return FileLock(self.tracker.lock_path)
        return self.storage_lock(f"tracking:{self.spec.name}")

    def finish(self, run_id: str, status: str) -> None:
        if self.tracker is not None:
            self.tracker.finish(run_id, status)

    # ------------------------------------------------------------ baselines
    def baseline_logged(self, name: str) -> bool:
        """Whether the study's ``name`` baseline run exists (whichever arm logged it)."""
        return self.tracker is not None and self.tracker.find_run(
            self.experiment, {"kind": "baseline", "baseline": name, "study": self.spec.name}) is not None

    def log_baseline(self, name: str, metrics: dict[str, dict[str, float]], ctx: Context, cfg: TopoCAMConfig) -> None:
        """A ``kind=baseline`` run: validation and test metrics (``metrics[split]``), the
        backbone's predicted-class counts, and the settings the baseline ran with."""
        if self.tracker is None:
            return
        health = ctx.health()
        rid = self.tracker.start_run(
            self.experiment, f"baseline-{name}",
            self.tags(kind="baseline", baseline=name, degenerate_backbone=str(health.degenerate).lower()),
            params={"backbone": ctx.backbone.arch, "backbone_init": ctx.backbone.init, "bins": cfg.bins, "outside": cfg.outside,
                    "mlp": cfg.mlp, "backbone_seed": cfg.seed, "backbone_selected_by": ctx.backbone.selected_by},
        )
        counts = {f"cnn_pred_{s}_class{c}": n for s, cs in health.predicted_counts.items() for c, n in enumerate(cs)}
        self.tracker.log_metrics(rid, {**flat_metrics("val", metrics["val"]), **flat_metrics("test", metrics["test"]), **counts})
        self.tracker.finish(rid)

    # ------------------------------------------------------------ one sampler
    def parent_run(self, sampler: str, seed: int, n_trials: int, degenerate: Callable[[], bool],
                   data_fingerprint: str | None = None) -> str | None:
        """The sampler run of (arm, sampler, seed), found or made, RUNNING, tagged with the budget
        asked for, the backbone's health (``degenerate()``, asked under the lock) and the
        fingerprint of the data the Optuna study was scored on (where it recorded one:
        ``topocam explain`` checks its data against it)."""
        if self.tracker is None:
            return None
        t, spec = self.tracker, self.spec
        tags = self.tags(kind="sampler", sampler=sampler, seed=seed)
        with self.lock():  # one parent per (arm, sampler, seed), however many workers
            rid = t.find_run(self.experiment, tags)
            if rid is None:
                base = spec.base
                rid = t.start_run(
                    self.experiment, f"{self.prefix}{sampler}-seed{seed}", tags,
                    params={"sampler": sampler, "seed": seed, "n_trials": n_trials, "objective": spec.objective,
                            "backbone": base.backbone, "backbone_epochs": base.epochs, "backbone_seed": base.seed,
                            "bins": base.bins, "outside": base.outside, "betti_backend": base.betti_backend,
                            "search_space": json.dumps({k: vars(p) for k, p in spec.space.items()}, default=str)},
                )
                t.log_text(rid, spec.text, f"study/{spec.path.name}")
            else:
                t.reopen(rid)
            # params are immutable: the latest budget is a tag; so is the backbone's health (DESIGN.md §2.10)
            t.set_tags(rid, {"budget": n_trials, "degenerate_backbone": str(degenerate()).lower(),
                             **({"data_fingerprint": data_fingerprint} if data_fingerprint else {})})
        return rid

    def start_trial(self, trial: optuna.Trial, sampler: str, seed: int, parent: str | None, params: dict[str, Any]) -> str | None:
        """The trial's run, nested under its sampler run (None when not tracked); tagged with the
        worker's ``repro_*`` fields (torch, CUDA, device, threads, deterministic flag): tags, not
        params, since a trial's params are its configuration (``topocam explain`` reads them back)."""
        if self.tracker is None:
            return None
        from ..core.seeding import reproducibility

        return self.tracker.start_run(
            self.experiment, f"{self.prefix}{sampler}-s{seed}-t{trial.number}",
            self.tags(kind="trial", sampler=sampler, seed=seed, trial=trial.number, optuna_study=trial.study.study_name,
                      **{f"repro_{k}": v for k, v in reproducibility(self.spec.base.device).items()}),
            parent=parent, params=params,
        )

    def tag_trial(self, run_id: str | None, tags: dict[str, str]) -> None:
        """Tags on the trial's run (the digests of the model it was scored on)."""
        if run_id is not None:
            self.tracker.set_tags(run_id, tags)

    def trial_failed(self, run_id: str | None, reason: str, duration_s: float, broken: bool) -> None:
        """The trial raised: FAILED when its configuration is broken, KILLED when its worker stopped."""
        if run_id is None:
            return
        self.tracker.set_tags(run_id, {"error": reason[:5000]})
        self.tracker.log_metrics(run_id, {"duration_s": duration_s})
        self.tracker.finish(run_id, "FAILED" if broken else "KILLED")

    def trial_finished(self, run_id: str | None, out: TrialOutcome, duration_s: float, error: str | None) -> None:
        """The trial's metrics and stage times; FAILED with ``error`` when its objective is not
        a finite number (Optuna fails it too), else FINISHED."""
        if run_id is None:
            return
        self.tracker.log_metrics(run_id, {**flat_metrics("val", out.val), **flat_metrics("cv", out.cv), "duration_s": duration_s,
                                          **{f"time_{k}_s": v for k, v in out.timings_s.items()},
                                          "roi_fraction_train": out.features.roi_fraction["train"]})
        if error is not None:  # Optuna fails a NaN objective: say why in MLflow too
            self.tracker.set_tags(run_id, {"error": error})
        self.tracker.finish(run_id, "FINISHED" if error is None else "FAILED")

    def sync_failed_trials(self, study: optuna.Study, sampler: str, seed: int) -> None:
        """MLflow trial runs still RUNNING whose Optuna trial has failed (a killed worker,
        failed by Optuna's heartbeat check) are marked KILLED, with the reason."""
        if self.tracker is None:
            return
        runs = self.tracker.find_runs(self.experiment, self.tags(kind="trial", sampler=sampler, seed=seed), status="RUNNING")
        if not runs:
            return
        state = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        for r in runs:
            n = r.data.tags.get("trial")
            if n is not None and state.get(int(n)) == S.FAIL:
                self.tracker.set_tags(r.info.run_id, {"error": "worker stopped during the trial (Optuna marked it FAIL: stale heartbeat)"})
                self.tracker.finish(r.info.run_id, "KILLED")

    def best_test(
        self, best: optuna.trial.FrozenTrial, sampler: str, seed: int, parent: str | None, params: dict[str, Any],
        compute: Callable[[], TrialOutcome],
    ) -> tuple[dict[str, float], dict[str, float] | None]:
        """Validation and test metrics of the chosen configuration (``params``): read back from its
        ``kind=best`` run when logged, else ``compute()``-d after the choice and logged once. An
        earlier best run of this (sampler, seed) for another trial is re-tagged
        ``kind=best_superseded``, so ``kind=best`` names the current choice only."""
        if self.tracker is None:
            out = compute()
            return out.val, out.test
        with self.lock():  # two workers finishing together log the best once
            t = self.tracker
            mine = None
            for kind in ("best", "best_superseded"):
                runs = t.find_runs(self.experiment, self.tags(kind=kind, sampler=sampler, seed=seed))
                for r in runs:
                    if r.data.tags.get("trial") == str(best.number) and r.info.status == "FINISHED" and mine is None:
                        mine = r
                    elif kind == "best":
                        t.set_tags(r.info.run_id, {"kind": "best_superseded"})
            if mine is not None:
                if mine.data.tags.get("kind") != "best":
                    t.set_tags(mine.info.run_id, {"kind": "best"})
                m = mine.data.metrics
                return ({k[4:]: v for k, v in m.items() if k.startswith("val_")}, {k[5:]: v for k, v in m.items() if k.startswith("test_")})
            out = compute()
            rid = t.start_run(
                self.experiment, f"{self.prefix}{sampler}-s{seed}-best", self.tags(kind="best", sampler=sampler, seed=seed, trial=best.number),
                parent=parent, params=params,
            )
            t.log_metrics(rid, {**flat_metrics("val", out.val), **flat_metrics("test", out.test)})
            t.finish(rid)
            if parent is not None:
                t.log_metrics(parent, {"best_" + self.spec.objective: best.value, "best_trial": best.number,
                                       **flat_metrics("best_test", out.test)})
        return out.val, out.test

    def log_sampler_artifacts(self, study: optuna.Study, run_id: str) -> None:
        """Plots and the trial history on the sampler run; redrawn only when trials were added."""
        from .plots import study_plots

        n_finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        if self.tracker.get_run(run_id).data.tags.get("plotted_trials") == str(n_finished):
            return  # what is logged already shows these trials
        with tempfile.TemporaryDirectory(prefix=f"topocam-{study.study_name}-") as tmp:
            folder = Path(tmp)
            for path in study_plots(study, folder):
                self.tracker.log_artifact(run_id, path, "plots")
            hist = folder / "history.csv"
            study.trials_dataframe().to_csv(hist, index=False)
            self.tracker.log_artifact(run_id, hist, "history")
        self.tracker.set_tags(run_id, {"plotted_trials": n_finished})
