"""Running, resuming, comparing and inspecting studies (Optuna + MLflow around the core).

One Optuna study per (study, sampler, seed), named ``<study>.<sampler>.s<seed>``
in the given storage (default: SQLite under the runs folder). The backbone and
CAM cache are built once (``pipeline.prepare``); a trial only fuses,
thresholds, computes Betti curves and fits the MLP, on train and val. Test
metrics are computed for the best trial of each (sampler, seed) only, after
the search, and never feed back into it.

Budget. ``n_trials`` is the number of trials that count (:func:`counts`):
COMPLETE ones, and FAILED ones whose configuration raised (so a broken
configuration cannot loop forever), whichever worker ran them. A trial lost with
its worker does not count and its configuration is run again: a worker killed
mid-trial stops sending Optuna heartbeats (every ``grace_period // 4`` s; the
study file's ``[study] grace_period``, default 20 s), and after the grace period
the next worker that looks marks the trial FAIL and re-queues its parameters
(Optuna's retry callback); a worker stopped by Ctrl-C or SIGTERM records the
reason (user attr ``stopped``), re-queues the trial and exits with code 130.
A worker creates (or takes a re-queued) trial only while the trials that count
plus those running number fewer than ``n_trials``; the check and the creation
happen under one lock all workers of the storage share (``storage.storage_lock``:
a file lock beside a SQLite or journal file, an advisory lock inside a
PostgreSQL/MySQL server, so it holds across machines and dies with a killed
worker's connection). When the rest of the budget is running elsewhere a worker
waits, so a lost trial is re-run by a survivor. Any number of workers together
finish exactly ``n_trials``. Optuna's journal storage has no heartbeat: there a
killed worker's trial stays RUNNING and counts.

Resume. A study that already exists is continued (same name in the same
storage) provided it was defined the same way: the objective, the fixed
configuration and the search space are recorded with the study, and a
mismatch is an error rather than a silent mix of incomparable trials.
"""

from __future__ import annotations

import hashlib
import errno
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna

from ..choices import check_n_trials, check_samplers
from ..errors import DegenerateBackboneWarning, InfrastructureError, TopoCAMError
from ..metrics import evaluate as score
from ..pipeline import ABLATION_ONLY, Context, TopoCAMConfig, evaluate, fit_and_score, original_features, prepare
from ..stores import FileLock
from ..tracking import DEFAULT_RUNS_DIR, Tracker, flat_metrics
from .samplers import OPTIONS_SECTION, SAMPLERS, make_sampler
from .space import apply_params, arm_space, suggest
from .storage import DatabaseLock, default_storage, open_storage, quiet_experimental, retry_callback, storage_lock  # noqa: F401
from .storage import infrastructure_error
from .studyfile import StudySpec
from .trials import ATTR_ERROR, ATTR_STOPPED, counts, scored_trials

S = optuna.trial.TrialState
FINISHED = (S.COMPLETE, S.FAIL, S.PRUNED)
ATTR_DEFINITION = "topocam_definition"


def _no_interrupt_traceback(record: logging.LogRecord) -> bool:
    """Optuna logs a trial stopped by Ctrl-C with a traceback: the stop is intended, say it in one line."""
    if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
        record.exc_info = record.exc_text = None
    return True


logging.getLogger("optuna.study._optimize").addFilter(_no_interrupt_traceback)


class _ConfigurationFailed(Exception):
    """A configuration raised (recorded in ``error``): Optuna records the trial FAIL and the study
    goes on. Anything else raised in a trial (storage, tracking, disk) stops the study."""


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def _used(study: optuna.Study) -> int:
    return sum(counts(t) for t in study.get_trials(deepcopy=False))


def failure_groups(trials: Sequence[optuna.trial.FrozenTrial]) -> list[dict[str, Any]]:
    """Failed trials grouped by error message, each group with the parameter values
    ALL its trials share: a CAM variant that always fails shows as ``{"cam": "scorecam"}``.
    Largest groups first."""
    groups: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for t in trials:
        if t.state == S.FAIL:
            groups.setdefault(str(t.user_attrs.get(ATTR_ERROR, "worker stopped during the trial (no error recorded)")), []).append(t)
    out = []
    for message, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        first = members[0].params
        shared = {k: v for k, v in first.items() if all(k in m.params and m.params[k] == v for m in members)}
        out.append({"error": message, "count": len(members), "trials": [m.number for m in members],
                    "shared_params": shared if len(members) > 1 else {}})
    return out


def optuna_name(spec: StudySpec, sampler: str, seed: int, arm: str = "topocam") -> str:
    """``<study>.<sampler>.s<seed>``; the tuned Topo-Original baseline is ``<study>-topo_original.<sampler>.s<seed>``."""
    return f"{spec.name}{'' if arm == 'topocam' else '-' + arm}.{sampler}.s{seed}"


def definition(spec: StudySpec) -> dict[str, Any]:
    """What makes trials comparable: objective, fixed configuration and search space
    (not where the data lives, the cache folder or the number of CPU jobs)."""
    base = spec.base.as_dict()
    for k in ("data_dir", "cache_dir", "n_jobs"):
        base.pop(k, None)
    defaults = TopoCAMConfig().as_dict()
    for k in ABLATION_ONLY:  # never set by a study file: left out at their defaults, so stored studies stay comparable
        if base.get(k) == defaults[k]:
            base.pop(k, None)
    space = {k: {a: v for a, v in vars(p).items() if v is not None and a != "name"} for k, p in sorted(spec.space.items())}
    return json.loads(json.dumps({"objective": spec.objective, "base": base, "space": space}, sort_keys=True, default=str))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: d}


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
    numbers: list[int] = field(default_factory=list)  # trial number of each entry of ``values``
    failures: list[dict[str, Any]] = field(default_factory=list)  # failed trials grouped by error (failure_groups)

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
    _seed_ctx: dict[int, Context] = field(default_factory=dict)  # replication contexts, one per model seed
    _running: int | None = None  # number of the trial this worker runs
    arm: str = "topocam"  # the method searched: "topocam", or "topo_original" (the equal-budget baseline)

    def for_arm(self, arm: str) -> "StudyRunner":
        """The same study for another method: its part of the space (:func:`arm_space`), the
        same sampler, budget, seeds and objective, sharing this runner's context, storage
        and tracker. A Topo-Original arm is the baseline tuned on an equal budget."""
        if arm == self.arm:
            return self
        self.ctx  # build once, share
        spec = replace(self.spec, base=replace(self.spec.base, method=arm), space=arm_space(self.spec.space, arm))
        return replace(self, spec=spec, arm=arm)

    @property
    def storage(self):
        if self._storage is None:
            self._storage = open_storage(self.storage_url, self.spec.grace_period)
        return self._storage

    @property
    def ctx(self) -> Context:
        if self._ctx is None:
            t0 = time.perf_counter()
            self._ctx = self._prepare(self.spec.base, self.spec.name)
            self.timings_s["prepare"] = time.perf_counter() - t0
        return self._ctx

    def seed_context(self, seed: int) -> Context:
        """The study's data and backbone recipe with another model seed (its own
        backbone, CAMs and MLP seed): what replication re-evaluates a choice on."""
        if seed == self.spec.base.seed:
            return self.ctx
        if seed not in self._seed_ctx:
            self._seed_ctx[seed] = self._prepare(replace(self.spec.base, seed=seed), f"{self.spec.name}, replication seed {seed}",
                                                 data=self.ctx.data)
        return self._seed_ctx[seed]

    def _prepare(self, config, label: str, data=None) -> Context:
        """``prepare`` with a degenerate backbone reported once through ``log`` (not as a
        Python warning per call)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateBackboneWarning)
            ctx = prepare(config, progress=self.progress, data=data)
        health = ctx.health()
        if health.degenerate:
            self.log(f"warning: {label}: {health.message}")
        return ctx

    def replicate(self, params: dict[str, Any], seeds: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Test (and validation) metrics of one chosen configuration under each model
        seed. Runs after the search, so nothing here feeds back into a choice."""
        out: dict[int, dict[str, Any]] = {}
        for seed in seeds:
            ctx = self.seed_context(seed)  # CAMs of the variant the configuration uses only, on first use
            cfg = replace(apply_params(self.spec.base, params), seed=seed)
            res = evaluate(ctx, cfg, report_test=True)
            out[seed] = {"val": res.val, "test": res.test, "degenerate_backbone": ctx.health().degenerate}
        return out

    def replicate_baselines(self, seeds: Sequence[int]) -> dict[str, dict[int, dict[str, float]]]:
        """CNN and Topo-Original test metrics under each model seed (base configuration)."""
        out: dict[str, dict[int, dict[str, float]]] = {"cnn": {}, "topo_original": {}}
        for seed in seeds:
            ctx = self.seed_context(seed)
            cfg = replace(self.spec.base, seed=seed)
            out["cnn"][seed] = score(ctx.data.y["test"], ctx.cnn_probs["test"], ctx.data.task)
            out["topo_original"][seed] = evaluate(ctx, replace(cfg, method="topo_original"), report_test=True).test
        return out

    def cam_variants(self) -> tuple[str, ...]:
        """The CAM variants trials can ask for (searched, fixed, or the base's)."""
        p = self.spec.space.get("cam")
        if p is None:
            return (self.spec.base.cam,)
        return tuple(p.choices) if p.kind == "categorical" else (p.value,)

    def warm_up(self) -> Context:
        """Build the backbone and every CAM variant the space can ask for, once per
        study: trial durations (and a sampler's wall time in a comparison) then
        measure trials only, whichever sampler happens to draw a variant first."""
        ctx = self.ctx
        for variant in self.cam_variants():
            ctx.cams(variant, "train")  # computes (or loads) every split of this variant
        return ctx

    @property
    def experiment(self) -> str | None:
        if self.tracker is not None and self._exp is None:
            self._exp = self.tracker.experiment(self.spec.name)
        return self._exp

    def _tags(self, **extra) -> dict[str, Any]:
        return {"study": self.spec.name, "dataset": self.spec.base.dataset, "arm": self.arm, **extra}

    def _prefix(self) -> str:
        """Run names of the Topo-Original arm start with it; TopoCAM's keep their names."""
        return "" if self.arm == "topocam" else f"{self.arm}-"

    def _tracking_lock(self) -> FileLock | DatabaseLock:
        """Serialises find-or-create of MLflow runs between workers: a file lock beside a local
        MLflow store; with a tracking server, a lock in the Optuna storage all workers share."""
        if self.tracker is None:
            return FileLock(None)
        if self.tracker.lock_path is not None:
            return FileLock(self.tracker.lock_path)
        return storage_lock(self.storage_url, self.storage, f"tracking:{self.spec.name}")

    # ------------------------------------------------------------ baselines
    def log_baselines(self) -> dict[str, dict]:
        """CNN and Topo-Original, once per study (skipped if already logged)."""
        out: dict[str, dict] = {}
        with self._tracking_lock():  # two workers starting together log them once
            for name in ("cnn", "topo_original"):
                if self.tracker is not None and self.tracker.find_run(self.experiment, {"kind": "baseline", "baseline": name, "study": self.spec.name}):
                    continue
                ctx, cfg = self.ctx, self.spec.base
                if name == "cnn":
                    res = {s: score(ctx.data.y[s], ctx.cnn_probs[s], ctx.data.task) for s in ("val", "test")}
                else:
                    fit = fit_and_score(ctx, cfg, original_features(ctx, cfg, report_test=True), report_test=True)
                    res = {"val": fit.val, "test": fit.test}
                out[name] = res
                if self.tracker is not None:
                    health = ctx.health()
                    rid = self.tracker.start_run(
                        self.experiment, f"baseline-{name}",
                        self._tags(kind="baseline", baseline=name, degenerate_backbone=str(health.degenerate).lower()),
                        params={"backbone": ctx.backbone.arch, "backbone_init": ctx.backbone.init, "bins": cfg.bins, "outside": cfg.outside,
                                "mlp": cfg.mlp, "backbone_seed": cfg.seed, "backbone_selected_by": ctx.backbone.selected_by},
                    )
                    counts = {f"cnn_pred_{s}_class{c}": n for s, cs in health.predicted_counts.items() for c, n in enumerate(cs)}
                    self.tracker.log_metrics(rid, {**flat_metrics("val", res["val"]), **flat_metrics("test", res["test"]), **counts})
                    self.tracker.finish(rid)
        return out

    # ------------------------------------------------------------ one sampler
    def _parent_run(self, sampler: str, seed: int, n_trials: int) -> str | None:
        if self.tracker is None:
            return None
        tags = self._tags(kind="sampler", sampler=sampler, seed=seed)
        with self._tracking_lock():  # one parent per (arm, sampler, seed), however many workers
            rid = self.tracker.find_run(self.experiment, tags)
            if rid is None:
                base = self.spec.base
                rid = self.tracker.start_run(
                    self.experiment, f"{self._prefix()}{sampler}-seed{seed}", tags,
                    params={"sampler": sampler, "seed": seed, "n_trials": n_trials, "objective": self.spec.objective,
                            "backbone": base.backbone, "backbone_epochs": base.epochs, "backbone_seed": base.seed,
                            "bins": base.bins, "outside": base.outside, "betti_backend": base.betti_backend,
                            "search_space": json.dumps({k: vars(p) for k, p in self.spec.space.items()}, default=str)},
                )
                self.tracker.log_text(rid, self.spec.text, f"study/{self.spec.path.name}")
            else:
                self.tracker.client.update_run(rid, status="RUNNING")
            # params are immutable: the latest budget is a tag; so is the backbone's health (DESIGN.md §2.10)
            self.tracker.set_tags(rid, {"budget": n_trials, "degenerate_backbone": str(self.ctx.health().degenerate).lower()})
        return rid

    def _objective(self, parent: str | None, sampler: str, seed: int, claim: FileLock | DatabaseLock | None = None):
        ctx = self.ctx
        spec = self.spec

        def objective(trial: optuna.Trial) -> float:
            self._running = trial.number
            if claim is not None:
                claim.release()  # the trial exists: other workers may claim the next one
            t0 = time.perf_counter()
            params = suggest(trial, spec.space)
            rid = None
            if self.tracker is not None:
                rid = self.tracker.start_run(
                    self.experiment, f"{self._prefix()}{sampler}-s{seed}-t{trial.number}",
                    self._tags(kind="trial", sampler=sampler, seed=seed, trial=trial.number, optuna_study=trial.study.study_name),
                    parent=parent, params=params,
                )
            try:
                cfg = apply_params(spec.base, params)
                out = evaluate(ctx, cfg, report_test=False, cv_folds=spec.cv_folds)
            except BaseException as exc:  # recorded, then Optuna marks the trial FAIL (or the run stops)
                # the configuration raised; else the worker was stopped (Ctrl-C) or its disk failed
                broken = isinstance(exc, Exception) and not (isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS)
                if broken:
                    reason = f"{type(exc).__name__}: {exc}"
                elif isinstance(exc, KeyboardInterrupt):
                    reason = "worker interrupted (KeyboardInterrupt: Ctrl-C or SIGTERM)"
                else:
                    reason = f"worker stopped: the disk failed ({type(exc).__name__}: {exc})"
                trial.set_user_attr(ATTR_ERROR if broken else ATTR_STOPPED, reason[:2000])
                if rid is not None:
                    self.tracker.set_tags(rid, {"error": reason[:5000]})
                    self.tracker.log_metrics(rid, {"duration_s": time.perf_counter() - t0})
                    self.tracker.finish(rid, "FAILED" if broken else "KILLED")
                if broken:
                    raise _ConfigurationFailed(reason) from exc
                raise
            value = (out.cv if spec.cv_folds else out.val)[spec.metric]
            not_finite = f"objective {spec.objective} is {value} (e.g. one class only in the split it is scored on)"
            if not math.isfinite(value):
                trial.set_user_attr(ATTR_ERROR, not_finite)
            duration = time.perf_counter() - t0
            for k, v in out.val.items():
                trial.set_user_attr(f"val_{k}", v)
            for k, v in (out.cv or {}).items():
                trial.set_user_attr(f"cv_{k}", v)
            trial.set_user_attr("duration_s", duration)
            if rid is not None:
                self.tracker.log_metrics(rid, {**flat_metrics("val", out.val), **flat_metrics("cv", out.cv), "duration_s": duration,
                                               **{f"time_{k}_s": v for k, v in out.timings_s.items()},
                                               "roi_fraction_train": out.features.roi_fraction["train"]})
                if not math.isfinite(value):  # Optuna fails a NaN objective: say why in MLflow too
                    self.tracker.set_tags(rid, {"error": not_finite})
                self.tracker.finish(rid, "FINISHED" if math.isfinite(value) else "FAILED")
            return value

        return objective

    def _check_definition(self, study: optuna.Study, sampler: str, seed: int) -> None:
        """Resume only a study defined the same way; record the definition of a new one."""
        attrs = study.user_attrs
        for k, want in (("topocam_study", self.spec.name), ("sampler", sampler), ("seed", seed)):
            if k in attrs and attrs[k] != want:
                raise TopoCAMError(
                    f"Optuna study {study.study_name!r} in {self.storage_url} belongs to {k} {attrs[k]!r}, not {want!r}; "
                    "rename [study] name or use another --storage"
                )
        mine = definition(self.spec)
        stored = attrs.get(ATTR_DEFINITION)
        if stored is None:
            for k, v in {"topocam_study": self.spec.name, "arm": self.arm, "sampler": sampler, "seed": seed,
                         "objective": self.spec.objective,
                         ATTR_DEFINITION: mine,
                         "topocam_definition_sha": hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()[:16]}.items():
                study.set_user_attr(k, v)
            return
        if stored != mine:
            a, b = _flatten(stored), _flatten(mine)
            changed = [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            raise TopoCAMError(
                f"{self.spec.path}: study {study.study_name!r} in {self.storage_url} was run with a different definition "
                f"({'; '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}); its trials would not be comparable. "
                "Rename [study] name for the new definition, or use another --storage"
            )

    def run(self, sampler: str, seed: int, n_trials: int | None = None) -> SamplerRun:
        """Run (or resume) one (sampler, seed) up to the budget; return its history. A failing
        storage, tracking store or disk stops it with an :class:`InfrastructureError`."""
        try:
            return self._run(sampler, seed, n_trials)
        except TopoCAMError:
            raise
        except Exception as exc:
            infra = self._infrastructure(exc)
            if infra is None:
                raise
            raise infra from exc

    def _run(self, sampler: str, seed: int, n_trials: int | None) -> SamplerRun:
        check_samplers(sampler)
        if n_trials is not None:
            check_n_trials(n_trials)
        n_trials = self.spec.n_trials if n_trials is None else int(n_trials)
        with quiet_experimental():
            study = optuna.create_study(
                study_name=optuna_name(self.spec, sampler, seed, self.arm), storage=self.storage, load_if_exists=True,
                sampler=make_sampler(sampler, seed, self.spec.sampler_options.get(OPTIONS_SECTION.get(sampler, sampler))), direction="maximize",
            )
            self._check_definition(study, sampler, seed)
            with self._claim(study):  # failed stale trials are re-queued: new trials, so under the claim
                optuna.storages.fail_stale_trials(study)
        parent = self._parent_run(sampler, seed, n_trials)
        status = "FAILED"
        try:
            self._sync_failed_trials(study, sampler, seed)
            if _used(study) < n_trials:
                self.warm_up()  # backbone, data and CAMs before the trial bar starts
                done = _used(study)
                bar = _TrialBar(n_trials, done, f"{sampler} seed {seed}", self.progress, study)
                try:
                    self._optimize(study, parent, sampler, seed, n_trials, bar)
                finally:
                    bar.close()
                self._sync_failed_trials(study, sampler, seed)
            result = self._summarise(study, sampler, seed, parent, n_trials)
            if parent is not None:
                self._log_sampler_artifacts(study, parent, result)
            status = "FINISHED"
            return result
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if parent is not None:
                try:
                    self.tracker.finish(parent, status)
                except Exception:  # noqa: BLE001 - the store is what failed: the error raised says so
                    if status == "FINISHED":
                        raise

    def _claim(self, study: optuna.Study) -> FileLock | DatabaseLock:
        """The lock under which a worker checks the budget and creates a trial (``storage_lock``)."""
        return storage_lock(self.storage_url, self.storage, f"claim:{study.study_name}")

    def _optimize(self, study: optuna.Study, parent: str | None, sampler: str, seed: int, n_trials: int, bar) -> None:
        """One trial at a time, each claimed under the storage's lock: a new trial (or a re-queued
        one) starts only while the trials that count (:func:`counts`) plus those running number
        fewer than ``n_trials``, so the budget holds across workers. When the rest of the budget
        is running elsewhere the worker waits: a trial lost with its worker is failed by the
        heartbeat check after the grace period, re-queued, and run here. Without a heartbeat
        (journal storage) a running trial counts as it is."""
        from optuna.storages._heartbeat import is_heartbeat_enabled

        claim = self._claim(study)
        objective = self._objective(parent, sampler, seed, claim)
        heartbeat = is_heartbeat_enabled(self.storage)
        while True:
            with claim:
                with quiet_experimental():
                    optuna.storages.fail_stale_trials(study)
                trials = study.get_trials(deepcopy=False)
                done = sum(counts(t) for t in trials)
                running = sum(t.state == S.RUNNING for t in trials)
                if done >= n_trials or (not heartbeat and done + running >= n_trials):
                    return
                if done + running < n_trials:
                    try:
                        with quiet_experimental():  # the lock is released by the objective once the trial exists
                            study.optimize(objective, n_trials=1, catch=(_ConfigurationFailed,), callbacks=[bar])
                    except BaseException:
                        self._requeue_lost(study)
                        raise
                    continue
            time.sleep(min(5.0, max(1.0, self.spec.grace_period / 4)))  # the rest is running elsewhere

    def _requeue_lost(self, study: optuna.Study) -> None:
        """Re-queue the trial this worker was running when it stopped (Ctrl-C, storage, tracking
        or disk failure), as the heartbeat check does for a killed worker's: it does not count,
        its configuration runs again. Best effort: the storage may be what failed."""
        try:
            for t in study.get_trials(deepcopy=False, states=(S.FAIL,)):
                if t.number == self._running and not counts(t):
                    retry_callback()(study, t)
        except Exception:  # noqa: BLE001 - the error being raised says what failed
            pass

    def _infrastructure(self, exc: Exception) -> InfrastructureError | None:
        """The error a failing store or disk raised, as one clear message (None: not one)."""
        return infrastructure_error(exc, self.storage_url, self.tracker.uri if self.tracker else None)

    def _sync_failed_trials(self, study: optuna.Study, sampler: str, seed: int) -> None:
        """MLflow trial runs still RUNNING whose Optuna trial has failed (a killed worker,
        failed by Optuna's heartbeat check) are marked KILLED, with the reason."""
        if self.tracker is None:
            return
        runs = self.tracker.find_runs(self.experiment, self._tags(kind="trial", sampler=sampler, seed=seed), status="RUNNING")
        if not runs:
            return
        state = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        for r in runs:
            n = r.data.tags.get("trial")
            if n is not None and state.get(int(n)) == S.FAIL:
                self.tracker.set_tags(r.info.run_id, {"error": "worker stopped during the trial (Optuna marked it FAIL: stale heartbeat)"})
                self.tracker.finish(r.info.run_id, "KILLED")

    def _summarise(self, study: optuna.Study, sampler: str, seed: int, parent: str | None, budget: int | None = None) -> SamplerRun:
        """History of the first ``budget`` finished trials (all by default): a study that
        holds more (run earlier with a larger budget) is summarised on the budget asked for."""
        trials = sorted((t for t in study.get_trials(deepcopy=False) if counts(t)), key=lambda t: t.number)
        if budget is not None and len(trials) > budget:
            self.log(f"{study.study_name}: {len(trials)} finished trials; reporting the first {budget} (the budget asked for)")
            trials = trials[:budget]
        values = [float(t.value) if t.state == S.COMPLETE and t.value is not None else float("nan") for t in trials]
        # Optuna's start-to-finish time of each trial: the sampler's own work (relative
        # sampling, e.g. CMA-ES or DE bookkeeping) counts toward a sampler's cost, not only the objective
        durations = [
            t.duration.total_seconds() if t.duration is not None else float(t.user_attrs.get("duration_s", float("nan")))
            for t in trials
        ]
        numbers = [t.number for t in trials]
        complete = scored_trials(trials)
        n_failed = len(trials) - len(complete)
        failures = failure_groups(trials)
        if not complete:
            return SamplerRun(sampler, seed, values, durations, float("nan"), {}, -1, None, None, n_failed, parent, numbers, failures)
        best = max(complete, key=lambda t: (t.value, -t.number))
        busy = [t.number for t in study.get_trials(deepcopy=False, states=(S.RUNNING, S.WAITING))]
        if busy and (budget is None or len(trials) < budget):
            # other workers are still searching: the last one to finish reports the test metrics
            self.log(f"{study.study_name}: trial(s) {busy} still running elsewhere; test metrics of the best "
                     "are reported when the search is over (by the last worker, or the next run)")
            val = {k[4:]: v for k, v in best.user_attrs.items() if k.startswith("val_")}
            return SamplerRun(sampler, seed, values, durations, float(best.value), dict(best.params), best.number, None, val,
                              n_failed, parent, numbers, failures)
        val, test = self._best_test(best, sampler, seed, parent)
        return SamplerRun(sampler, seed, values, durations, float(best.value), dict(best.params), best.number, test, val,
                          n_failed, parent, numbers, failures)

    def _best_test(self, best: optuna.trial.FrozenTrial, sampler: str, seed: int, parent: str | None):
        """Test metrics of the chosen configuration: computed after the choice, logged once.
        An earlier best run of this (sampler, seed) for another trial is re-tagged
        ``kind=best_superseded``, so ``kind=best`` names the current choice only."""
        params = {**{k: p.value for k, p in self.spec.space.items() if p.kind == "fixed"}, **best.params}
        if self.tracker is None:
            out = evaluate(self.ctx, apply_params(self.spec.base, params), report_test=True)
            return out.val, out.test
        with self._tracking_lock():  # two workers finishing together log the best once
            t = self.tracker
            mine = None
            for kind in ("best", "best_superseded"):
                runs = t.find_runs(self.experiment, self._tags(kind=kind, sampler=sampler, seed=seed))
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
            out = evaluate(self.ctx, apply_params(self.spec.base, params), report_test=True)
            rid = t.start_run(
                self.experiment, f"{self._prefix()}{sampler}-s{seed}-best", self._tags(kind="best", sampler=sampler, seed=seed, trial=best.number),
                parent=parent, params=params,
            )
            t.log_metrics(rid, {**flat_metrics("val", out.val), **flat_metrics("test", out.test)})
            t.finish(rid)
            if parent is not None:
                t.log_metrics(parent, {"best_" + self.spec.objective: best.value, "best_trial": best.number,
                                       **flat_metrics("best_test", out.test)})
        return out.val, out.test

    def _log_sampler_artifacts(self, study: optuna.Study, run_id: str, result: SamplerRun) -> None:
        """Plots and the trial history on the sampler run; redrawn only when trials were added."""
        from .plots import study_plots

        n_finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        if self.tracker.client.get_run(run_id).data.tags.get("plotted_trials") == str(n_finished):
            return  # what is logged already shows these trials
        with tempfile.TemporaryDirectory(prefix=f"topocam-{study.study_name}-") as tmp:
            folder = Path(tmp)
            for path in study_plots(study, folder):
                self.tracker.log_artifact(run_id, path, "plots")
            hist = folder / "history.csv"
            study.trials_dataframe().to_csv(hist, index=False)
            self.tracker.log_artifact(run_id, hist, "history")
        self.tracker.set_tags(run_id, {"plotted_trials": n_finished})


class _TrialBar:
    """tqdm bar over the budget with the best value so far and the failures (ETA from tqdm)."""

    def __init__(self, total: int, done: int, desc: str, enabled: bool, study: optuna.Study):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=min(done, total), desc=desc, unit="trial", disable=not enabled, leave=True)
        self._postfix(study)

    def _postfix(self, study: optuna.Study) -> None:
        trials = [t for t in study.get_trials(deepcopy=False) if counts(t)]
        good = [t.value for t in scored_trials(trials)]
        post = {"best": f"{max(good):.4f}" if good else "—"}
        failed = sum(t.state == S.FAIL for t in trials)
        if failed:
            post["failed"] = failed
        self.bar.set_postfix(post)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.bar.n < self.bar.total:
            self.bar.update(1)
        self._postfix(study)

    def close(self) -> None:
        self.bar.close()


def study_status(name: str, storage_url: str) -> list[dict[str, Any]]:
    """One row per (sampler, seed) study of ``name``: trial counts and best value."""
    storage = open_storage(storage_url)
    with quiet_experimental():
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    owner = {s.study_name: s.user_attrs.get("topocam_study", _owner_from_name(s.study_name)) for s in summaries}
    mine = sorted(n for n, o in owner.items() if o == name)
    if not mine:
        known = sorted(set(owner.values()))
        raise TopoCAMError(f"no study named {name!r} in {storage_url}; studies there: {', '.join(known) or 'none'}")
    rows = [_status_row(optuna.load_study(study_name=n, storage=storage)) for n in mine]
    return sorted(rows, key=lambda r: (str(r["sampler"]), r["seed"] if isinstance(r["seed"], int) else -1, r["study"]))


def _owner_from_name(optuna_study: str) -> str:
    """``<study>.<sampler>.s<seed>`` -> ``<study>`` (studies written before user attrs were recorded)."""
    parts = optuna_study.rsplit(".", 2)
    if len(parts) == 3 and parts[1] in SAMPLERS and parts[2][:1] == "s" and parts[2][1:].isdigit():
        return parts[0]
    return optuna_study


def _status_row(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    count = {st: sum(t.state == st for t in trials) for st in (S.COMPLETE, S.RUNNING, S.FAIL, S.PRUNED, S.WAITING)}
    good = scored_trials(trials)
    best = max(good, key=lambda t: (t.value, -t.number)) if good else None
    parts = study.study_name.rsplit(".", 2)
    sampler = study.user_attrs.get("sampler", parts[1] if len(parts) == 3 else "?")
    seed = study.user_attrs.get("seed", int(parts[2][1:]) if len(parts) == 3 and parts[2][1:].isdigit() else "?")
    return {"study": study.study_name, "sampler": sampler, "seed": seed, "trials": len(trials),
            "complete": count[S.COMPLETE], "running": count[S.RUNNING], "failed": count[S.FAIL], "pruned": count[S.PRUNED],
            "waiting": count[S.WAITING], "best_value": float(best.value) if best else float("nan"),
            "best_trial": best.number if best else -1}
