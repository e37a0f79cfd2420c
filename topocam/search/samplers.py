"""The samplers a study can compare, each built from (name, seed).

* ``de``: differential evolution (the paper's optimiser), our Optuna sampler
  with its population state in the study's storage (see ``de.py``), with the
  ``[sampler.de]`` options (generational "deferred" updating by default);
* ``de_immediate``: the same DE with scipy's default ``updating="immediate"``
  (a finished trial replaces its target at once), so one comparison can hold
  both modes;
* ``tpe``: Optuna's TPE (its default sampler);
* ``cmaes``: Optuna's CMA-ES on the continuous and integer parameters. CMA-ES
  has no categorical distribution: the CAM variant (and any other categorical)
  is drawn by CMA-ES's independent sampler, seeded random sampling; we name
  that independent sampler explicitly and silence the per-trial warning;
* ``random``: uniform random search, the control;
* ``gp``: Optuna's Gaussian-process sampler (optional; needs scipy and torch).

Seeding. Optuna's own samplers keep one random stream per sampler *object*:
a resumed study (a new process, a new object with the same seed) would replay
the proposals of its first trials, and two workers with the same seed would
propose the same points. So ``tpe``, ``cmaes``, ``random`` and ``gp`` are
wrapped in :class:`PerTrialSeeded`: trial ``n`` is proposed by a fresh sampler
seeded from ``(seed, n)``. Every proposal is then a function of the seed, the
trial number and the study's history, as for ``de`` (whose randomness comes
from ``(seed, generation, slot)``): a resumed run reproduces an uninterrupted
one, and workers never repeat each other.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from ..core.choices import check_samplers
from ..core.errors import TopoCAMError

OPTIONS_SECTION: dict[str, str] = {"de": "de", "de_immediate": "de"}  # sampler -> its [sampler.X] table


def trial_seed(seed: int, number: int) -> int:
    """Seed of trial ``number`` of a study seeded with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(number)]).generate_state(1)[0])


class PerTrialSeeded(BaseSampler):
    """Delegates each trial to a fresh sampler built by ``factory(trial_seed(seed, number))``.

    Optuna's samplers keep no state between trials besides their random
    stream (TPE, random, GP refit on the stored trials every time; CMA-ES keeps
    its optimiser in the trials' system attributes), so nothing is lost.
    """

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int) -> None:
        self._factory = factory
        self._seed = int(seed)
        self._per_trial: dict[int, BaseSampler] = {}
        self._lock = threading.Lock()

    def _for(self, trial: FrozenTrial) -> BaseSampler:
        with self._lock:
            s = self._per_trial.get(trial._trial_id)
            if s is None:
                s = self._per_trial[trial._trial_id] = self._factory(trial_seed(self._seed, trial.number))
            return s

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values) -> None:
        try:
            self._for(trial).after_trial(study, trial, state, values)
        finally:
            with self._lock:
                self._per_trial.pop(trial._trial_id, None)

    def reseed_rng(self) -> None:
        """Nothing to reseed: the randomness of a trial is a function of (seed, trial number)."""


def _factory(name: str) -> Callable[[int], BaseSampler]:
    if name == "tpe":
        return lambda s: optuna.samplers.TPESampler(seed=s)
    if name == "cmaes":
        return lambda s: optuna.samplers.CmaEsSampler(
            seed=s, independent_sampler=optuna.samplers.RandomSampler(seed=s), warn_independent_sampling=False
        )
    if name == "random":
        return lambda s: optuna.samplers.RandomSampler(seed=s)
    if name == "gp":
        return lambda s: optuna.samplers.GPSampler(seed=s)
    raise AssertionError(f"sampler {name!r} is in SAMPLERS but has no factory")


def make_sampler(name: str, seed: int, options: dict[str, Any] | None = None) -> BaseSampler:
    check_samplers(name)
    options = options or {}
    if name in ("de", "de_immediate"):
        from .de import DifferentialEvolutionSampler, DifferentialEvolutionSamplerError

        if name == "de_immediate":
            options = {**options, "updating": "immediate"}
        try:
            return DifferentialEvolutionSampler(seed=seed, **options)
        except DifferentialEvolutionSamplerError as exc:
            raise TopoCAMError(f"[sampler.de]: {exc}") from None
    if options:
        raise TopoCAMError(f"sampler {name!r} takes no options (got {sorted(options)}); only [sampler.de] is configurable")
    return PerTrialSeeded(_factory(name), seed)
