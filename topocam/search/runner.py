"""Running and resuming a study's searches: the loop of Optuna trials around the core.

Its neighbours: :mod:`.storage` opens the Optuna storage and its lock, :mod:`.fingerprint`
checks that a resumed study was defined the same way, :mod:`.mlflow_runs` logs the runs
(the runner decides what is computed, ``StudyRuns`` what is logged where), :mod:`.status`
reports a study and draws the trial bar, :mod:`.compare` compares samplers.

One Optuna study per (study, sampler, seed), named ``<study>.<sampler>.s<seed>``
in the given storage (default: SQLite under the runs folder). The backbone and
CAM cache are built once (``pipeline.prepare``), and on a storage shared between
machines published once and fetched and verified by every worker (:mod:`.artifacts`),
so all trials are scored on one model and record its digests; a trial only fuses,
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
storage) provided it was defined the same way and its data have the fingerprint it
recorded (:mod:`.fingerprint`). A new one is created only if every other Optuna study of
its ``[study] name`` (other samplers, seeds, arms) was defined the same way and scored on
the same data, and only if its objective can be computed on the data's labels
(:meth:`StudyRunner.preflight`, before any training).
"""

from __future__ import annotations

import errno
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna

from ..core.choices import check_n_trials, check_sampler_seed
from ..core.data import Dataset
from ..core.errors import DegenerateBackboneWarning, InfrastructureError, Terminated, TopoCAMError
from ..core.pipeline import BASELINES, Context, baseline, evaluate, load_data, prepare
from ..core.locks import FileLock
from ..stores import DEFAULT_RUNS_DIR
from ..tracking import Tracker
from .artifacts import Model, ModelArtifacts, record_in, study_cam_variants
from .fingerprint import ATTR_DATA, ATTR_DEFINITION, arm_spec, check_attrs, check_data, check_definition, check_name
from .mlflow_runs import StudyRuns
from .samplers import OPTIONS_SECTION, check_samplers, make_sampler
from .space import apply_params, suggest
from .storage import DatabaseLock, open_storage, quiet_experimental, retry_callback, storage_lock
from .storage import infrastructure_error
from .status import TrialBar, failure_groups
from .studyfile import StudySpec
from .trials import ATTR_ERROR, ATTR_STOPPED, counts, scored_trials

S = optuna.trial.TrialState


_STOPPED_TRIALS: set[int] = set()  # trials Optuna said "failed" of, that Ctrl-C or SIGTERM stopped


def _no_interrupt_lines(record: logging.LogRecord) -> bool:
    """Optuna logs a trial stopped by Ctrl-C or SIGTERM as failed, with a traceback, then "failed
    with value None": the stop is intended, the trial re-queued, and the CLI says it in one line
    ("interrupted", "terminated (SIGTERM)"). Both records are dropped."""
    message = record.getMessage()
    number = message.split(" ", 2)[1] if message.startswith("Trial ") else ""
    if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
        if number.isdigit():
            _STOPPED_TRIALS.add(int(number))
        return False
    if number.isdigit() and int(number) in _STOPPED_TRIALS and message.endswith("failed with value None."):
        _STOPPED_TRIALS.discard(int(number))
        return False
    return True


logging.getLogger("optuna.study._optimize").addFilter(_no_interrupt_lines)


class _ConfigurationFailed(Exception):
    """A configuration raised (recorded in ``error``): Optuna records the trial FAIL and the study
    goes on. Anything else raised in a trial (storage, tracking, disk) stops the study."""


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def _used(study: optuna.Study) -> int:
    return sum(counts(t) for t in study.get_trials(deepcopy=False))


def check_objective(spec: StudySpec, data: Dataset) -> None:
    """The study's objective can be computed on the data's labels, else an error before any
    training: an AUC on validation needs every class in the validation split (binary: both;
    multi-class: one-vs-rest for each class), a K-fold one ``cv_folds`` training images of each."""
    where = f"{spec.path}: [study] objective {spec.objective!r} cannot be computed"
    if spec.cv_folds:
        counts = np.bincount(data.y["train"], minlength=data.n_classes)
        few = [c for c in range(data.n_classes) if counts[c] < spec.cv_folds]
        if few:
            raise TopoCAMError(
                f"{where}: class(es) {few} have fewer than {spec.cv_folds} images in the training split of {data.source} "
                f"(counts {counts.tolist()}; {spec.cv_folds}-fold cross-validation needs {spec.cv_folds} of each); "
                f"use objective = \"val_{spec.metric}\" or add training images"
            )
        return
    if spec.metric != "auc":
        return
    present = sorted(set(np.unique(data.y["val"]).tolist()))
    absent = sorted(set(range(data.n_classes)) - set(present))
    if absent:
        raise TopoCAMError(
            f"{where}: the validation split of {data.source} holds class(es) {present} only (class(es) {absent} absent), "
            "and a validation AUC needs every class; use objective = \"val_acc\" or \"cv_auc\" (5-fold AUC on the "
            "training split), or a validation split with every class"
        )


def optuna_name(spec: StudySpec, sampler: str, seed: int, arm: str = "topocam") -> str:
    """``<study>.<sampler>.s<seed>``; the tuned Topo-Original baseline is ``<study>-topo_original.<sampler>.s<seed>``."""
    return f"{spec.name}{'' if arm == 'topocam' else '-' + arm}.{sampler}.s{seed}"


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
    study_spec: StudySpec | None = None  # the study as its file defines it (all arms); None: ``spec``
    _data: Dataset | None = None
    _preflighted: set = field(default_factory=set)  # (arm, sampler, seed) checked by preflight
    models: dict[int, Model] = field(default_factory=dict)  # model seed -> the published model its trials are scored on

    @classmethod
    def open(cls, spec: StudySpec, storage_url: str, tracking_uri: str | None, runs_dir: Path = DEFAULT_RUNS_DIR,
             **options: Any) -> "StudyRunner":
        """A tracked runner on opened stores: the Optuna storage first, then the MLflow tracking
        store (``tracking_uri`` None: the one under ``runs_dir``), so that a bad URL of either
        fails within seconds, before any training. ``options``: the other fields (``progress``, ``log``,
        ``data``: the study's data, checked before any store is opened, :func:`pipeline.load_checked`)."""
        storage = open_storage(storage_url, spec.grace_period)
        data = options.pop("data", None)  # the study's data, where already read and checked
        return cls(spec, storage_url, Tracker(tracking_uri, runs_dir), runs_dir=runs_dir, _storage=storage, _data=data,
                   **options)

    def for_arm(self, arm: str) -> "StudyRunner":
        """The same study for another method: its part of the space (:func:`arm_space`), the
        same sampler, budget, seeds and objective, sharing this runner's context, storage
        and tracker. A Topo-Original arm is the baseline tuned on an equal budget."""
        if arm == self.arm:
            return self
        self.ctx  # build once, share
        root = self.study_spec or self.spec
        return replace(self, spec=arm_spec(root, arm), arm=arm, study_spec=root)

    @property
    def storage(self):
        if self._storage is None:
            self._storage = open_storage(self.storage_url, self.spec.grace_period)
        return self._storage

    @property
    def data(self) -> Dataset:
        """The study's dataset, loaded once (the context is built on it)."""
        if self._ctx is not None:
            return self._ctx.data
        if self._data is None:
            self._data = load_data(self.spec.base)
        return self._data

    @property
    def ctx(self) -> Context:
        if self._ctx is None:
            t0 = time.perf_counter()
            self._ctx = self._prepare(self.spec.base, self.spec.name, data=self.data)
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

    @property
    def artifacts(self) -> ModelArtifacts:
        """Where this study's model is published and fetched (:mod:`.artifacts`)."""
        root = self.study_spec or self.spec
        return ModelArtifacts(root.name, self.storage_url, self.storage, self.tracker, self.log, self.timings_s)

    def all_cam_variants(self) -> tuple[str, ...]:
        """The CAM variants any arm's trials can ask for: what a published model holds."""
        return study_cam_variants(self.study_spec or self.spec)

    def _prepare(self, config, label: str, data=None, publish: bool | None = None) -> Context:
        """``prepare`` on the study's published model: its entries fetched and verified first
        (:meth:`.artifacts.ModelArtifacts.ensure`; built and published where none is), so every
        worker scores trials on the same backbone and CAMs. A degenerate backbone is reported
        once through ``log`` (not as a Python warning per call)."""
        data = data if data is not None else self.data
        built: dict[str, Context] = {}

        def build(full: bool) -> bool:
            ctx = built["ctx"] = self._prepare_local(config, data)
            computed = not ctx.backbone.cached
            if full:
                for v in self.all_cam_variants():
                    ctx.cams(v, "train")
                computed = computed or any(k.startswith("cams_") for k in ctx.timings_s)
            return computed

        t0 = time.perf_counter()
        model = self.artifacts.ensure(config, data, self.all_cam_variants(), build, publish)
        self.models[config.seed] = model
        ctx = built.get("ctx") or self._prepare_local(config, data)
        ctx.timings_s[f"model_{model.how}"] = time.perf_counter() - t0
        if model.how != "local":
            cams = sorted(k[5:] for k in ctx.timings_s if k.startswith("cams_"))
            self.log(f"model of {label}: {model.how} ({len(model.entries.all)} entries, backbone sha256 "
                     f"{model.sha256(model.entries.backbone)[:12]}…); this worker "
                     f"{'trained the backbone' if not ctx.backbone.cached else 'trained no backbone'} and "
                     f"{'computed CAMs ' + ', '.join(cams) if cams else 'computed no CAM'}")
        health = ctx.health()
        if health.degenerate:
            self.log(f"warning: {label}: {health.message}")
        return ctx

    def _prepare_local(self, config, data) -> Context:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateBackboneWarning)
            return prepare(config, progress=self.progress, data=data)

    def prepare_model(self) -> list[Model]:
        """``topocam study prepare``: every model seed the study uses (its ``[backbone] seed`` and
        ``replicate_seeds``) built, or fetched, and published with every searched CAM variant."""
        root = self.study_spec or self.spec
        seeds = list(dict.fromkeys([root.base.seed, *root.replicate_seeds]))
        with self._failing_stores():
            for seed in seeds:
                cfg = replace(root.base, seed=seed)
                ctx = self._prepare(cfg, f"{root.name}, seed {seed}", publish=True)
                if seed == root.base.seed:
                    self._ctx = ctx
        return [self.models[s] for s in seeds]

    def preflight(self, sampler: str, seed: int, arm: str | None = None) -> None:
        """What can be checked before any training, for (``arm``, sampler, seed): the objective
        can be computed on the data's labels (:func:`check_objective`); an existing Optuna study
        was defined the same way and its data have the fingerprint it recorded; a new one's
        name holds no other definition or data in the storage (:func:`.fingerprint.check_name`).
        Loads the data, reads the storage, trains nothing; each (arm, sampler, seed) once. A
        failing storage is an :class:`InfrastructureError`, as in :meth:`run`."""
        with self._failing_stores():
            self._preflight(sampler, seed, arm or self.arm)

    @contextmanager
    def _failing_stores(self) -> Iterator[None]:
        """A storage, tracking store or disk failing inside: an :class:`InfrastructureError`
        (our own errors and anything else pass unchanged)."""
        try:
            yield
        except TopoCAMError:
            raise
        except Exception as exc:
            infra = self._infrastructure(exc)
            if infra is None:
                raise
            raise infra from exc

    def _preflight(self, sampler: str, seed: int, arm: str) -> None:
        if (arm, sampler, seed) in self._preflighted:
            return
        root = self.study_spec or self.spec
        spec = arm_spec(root, arm)
        check_objective(spec, self.data)
        name = optuna_name(spec, sampler, seed, arm)
        summaries = optuna.get_all_study_summaries(self.storage, include_best_trial=False)
        mine = [s for s in summaries if s.study_name == name]
        if mine:  # resumed: the same definition (and the data it was scored on)
            attrs = mine[0].user_attrs
            check_attrs(name, attrs, spec, sampler, seed, self.storage_url)
            if ATTR_DEFINITION in attrs:  # else just created (by another worker): check_definition records both
                check_data(attrs, name, self.data, self.log)
        else:
            check_name(summaries, root, name, self.storage_url, self.data)
        self._preflighted.add((arm, sampler, seed))

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
        out: dict[str, dict[int, dict[str, float]]] = {name: {} for name in BASELINES}
        for seed in seeds:
            ctx = self.seed_context(seed)
            cfg = replace(self.spec.base, seed=seed)
            for name in BASELINES:
                out[name][seed] = baseline(ctx, cfg, name).test
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

    @property
    def runs(self) -> StudyRuns:
        """This arm's runs in MLflow (:mod:`.mlflow_runs`); without a tracker, nothing is logged."""
        return StudyRuns(self.tracker, self.experiment, self.spec, self.arm, self._storage_lock)

    def _storage_lock(self, name: str) -> FileLock | DatabaseLock:
        """The lock ``name`` all workers of this storage share (``storage.storage_lock``)."""
        return storage_lock(self.storage_url, self.storage, name)

    # ------------------------------------------------------------ baselines
    def log_baselines(self) -> dict[str, dict]:
        """CNN and Topo-Original, once per study (skipped if already logged)."""
        out: dict[str, dict] = {}
        runs = self.runs
        with runs.lock():  # two workers starting together log them once
            for name in BASELINES:
                if runs.baseline_logged(name):
                    continue
                b = baseline(self.ctx, self.spec.base, name)
                out[name] = {"val": b.val, "test": b.test}
                runs.log_baseline(name, out[name], self.ctx, self.spec.base)
        return out

    # ------------------------------------------------------------ one sampler
    def _objective(self, parent: str | None, sampler: str, seed: int):
        ctx, spec, runs = self.ctx, self.spec, self.runs

        def objective(trial: optuna.Trial) -> float:
            t0 = time.perf_counter()
            params = suggest(trial, spec.space)
            rid = runs.start_trial(trial, sampler, seed, parent, params)
            try:
                cfg = apply_params(spec.base, params)
                out = evaluate(ctx, cfg, report_test=False, cv_folds=spec.cv_folds)
            except BaseException as exc:  # recorded, then Optuna marks the trial FAIL (or the run stops)
                # the configuration raised; else the worker was stopped (Ctrl-C) or its disk failed
                broken = isinstance(exc, Exception) and not (isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS)
                if broken:
                    reason = f"{type(exc).__name__}: {exc}"
                elif isinstance(exc, Terminated):
                    reason = "worker terminated (SIGTERM)"
                elif isinstance(exc, KeyboardInterrupt):
                    reason = "worker interrupted (KeyboardInterrupt: Ctrl-C)"
                else:
                    reason = f"worker stopped: the disk failed ({type(exc).__name__}: {exc})"
                trial.set_user_attr(ATTR_ERROR if broken else ATTR_STOPPED, reason[:2000])
                runs.trial_failed(rid, reason, time.perf_counter() - t0, broken)
                if broken:
                    raise _ConfigurationFailed(reason) from exc
                raise
            value = (out.cv if spec.cv_folds else out.val)[spec.metric]
            not_finite = f"objective {spec.objective} is {value} (e.g. one class only in the split it is scored on)"
            if not math.isfinite(value):
                trial.set_user_attr(ATTR_ERROR, not_finite)
            duration = time.perf_counter() - t0
            model = self.models.get(spec.base.seed)
            digests = model.digests(cfg.cam if cfg.method == "topocam" else None) if model is not None else {}
            for k, v in digests.items():  # which model this trial was scored on
                trial.set_user_attr(k, v)
            runs.tag_trial(rid, digests)
            for k, v in out.val.items():
                trial.set_user_attr(f"val_{k}", v)
            for k, v in (out.cv or {}).items():
                trial.set_user_attr(f"cv_{k}", v)
            trial.set_user_attr("duration_s", duration)
            runs.trial_finished(rid, out, duration, None if math.isfinite(value) else not_finite)
            return value

        return objective

    def run(self, sampler: str, seed: int, n_trials: int | None = None) -> SamplerRun:
        """Run (or resume) one (sampler, seed) up to the budget; return its history. A failing
        storage, tracking store or disk stops it with an :class:`InfrastructureError`."""
        check_sampler_seed(seed)
        with self._failing_stores():
            return self._run(sampler, seed, n_trials)

    def _run(self, sampler: str, seed: int, n_trials: int | None) -> SamplerRun:
        check_samplers(sampler)
        if n_trials is not None:
            check_n_trials(n_trials)
        n_trials = self.spec.n_trials if n_trials is None else int(n_trials)
        self.preflight(sampler, seed)
        with quiet_experimental():
            study = optuna.create_study(
                study_name=optuna_name(self.spec, sampler, seed, self.arm), storage=self.storage, load_if_exists=True,
                sampler=make_sampler(sampler, seed, self.spec.sampler_options.get(OPTIONS_SECTION.get(sampler, sampler))), direction="maximize",
            )
            check_definition(study, self.spec, self.arm, sampler, seed, self.storage_url, self.data.fingerprint)
            with self._claim(study):  # failed stale trials are re-queued: new trials, so under the claim
                optuna.storages.fail_stale_trials(study)
        self.ctx  # the model (fetched and verified, or built and published) before any trial
        if self.spec.base.seed in self.models:
            record_in(study, self.models[self.spec.base.seed])
        parent = self.runs.parent_run(sampler, seed, n_trials, lambda: self.ctx.health().degenerate,
                                      study.user_attrs.get(ATTR_DATA))
        status = "FAILED"
        try:
            self.runs.sync_failed_trials(study, sampler, seed)
            if _used(study) < n_trials:
                self.warm_up()  # backbone, data and CAMs before the trial bar starts
                done = _used(study)
                bar = TrialBar(n_trials, done, f"{sampler} seed {seed}", self.progress, study)
                try:
                    self._optimize(study, parent, sampler, seed, n_trials, bar)
                finally:
                    bar.close()
                self.runs.sync_failed_trials(study, sampler, seed)
            result = self._summarise(study, sampler, seed, parent, n_trials)
            if parent is not None:
                self.runs.log_sampler_artifacts(study, parent)
            status = "FINISHED"
            return result
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if parent is not None:
                try:
                    self.runs.finish(parent, status)
                except Exception:  # noqa: BLE001 - the store is what failed: the error raised says so
                    if status == "FINISHED":
                        raise

    @contextmanager
    def _claim(self, study: optuna.Study) -> Iterator[Callable[[], None]]:
        """The budget claim: the storage's lock (``storage_lock``) under which a worker checks the
        budget and creates a trial, held for the ``with`` block. The block may let go earlier by
        calling what it yields, once the trial exists (releasing twice is harmless)."""
        lock = self._storage_lock(f"claim:{study.study_name}")
        with lock:
            yield lock.release

    def _optimize(self, study: optuna.Study, parent: str | None, sampler: str, seed: int, n_trials: int, bar) -> None:
        """One trial at a time, each claimed under the storage's lock: a new trial (or a re-queued
        one) starts only while the trials that count (:func:`counts`) plus those running number
        fewer than ``n_trials``, so the budget holds across workers. When the rest of the budget
        is running elsewhere the worker waits: a trial lost with its worker is failed by the
        heartbeat check after the grace period, re-queued, and run here. Without a heartbeat
        (journal storage) a running trial counts as it is."""
        from optuna.storages._heartbeat import is_heartbeat_enabled

        objective = self._objective(parent, sampler, seed)
        heartbeat = is_heartbeat_enabled(self.storage)
        while True:
            with self._claim(study) as release:
                with quiet_experimental():
                    optuna.storages.fail_stale_trials(study)
                trials = study.get_trials(deepcopy=False)
                done = sum(counts(t) for t in trials)
                running = sum(t.state == S.RUNNING for t in trials)
                if done >= n_trials or (not heartbeat and done + running >= n_trials):
                    return
                if done + running < n_trials:
                    def admitted(trial: optuna.Trial) -> float:
                        self._running = trial.number
                        release()  # the trial exists (Optuna created it under the claim): other workers may claim the next one
                        return objective(trial)

                    try:
                        with quiet_experimental():
                            study.optimize(admitted, n_trials=1, catch=(_ConfigurationFailed,), callbacks=[bar])
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
        params = {**{k: p.value for k, p in self.spec.space.items() if p.kind == "fixed"}, **best.params}
        val, test = self.runs.best_test(best, sampler, seed, parent, params,
                                        lambda: evaluate(self.ctx, apply_params(self.spec.base, params), report_test=True))
        return SamplerRun(sampler, seed, values, durations, float(best.value), dict(best.params), best.number, test, val,
                          n_failed, parent, numbers, failures)
