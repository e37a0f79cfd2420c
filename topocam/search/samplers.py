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

:data:`SAMPLER_TABLE` is the one declaration: name -> how it is built and which
``[sampler.X]`` options table it reads. ``SAMPLERS`` (the names a study file and
the CLI accept) are its keys; adding a sampler is adding a row.

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
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from ..core.choices import choice_enum
from ..core.errors import TopoCAMError


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


def _per_trial(factory: Callable[[int], BaseSampler]) -> Callable[[int, dict[str, Any]], BaseSampler]:
    """An Optuna sampler, trial ``n`` proposed by ``factory(trial_seed(seed, n))`` (:class:`PerTrialSeeded`)."""
    return lambda seed, options: PerTrialSeeded(factory, seed)


def _de(**fixed: Any) -> Callable[[int, dict[str, Any]], BaseSampler]:
    """Our DE sampler (``de.py``) with the ``[sampler.de]`` options, ``fixed`` ones over them."""

    def build(seed: int, options: dict[str, Any]) -> BaseSampler:
        from .de import DifferentialEvolutionSampler, DifferentialEvolutionSamplerError

        try:
            return DifferentialEvolutionSampler(seed=seed, **{**options, **fixed})
        except DifferentialEvolutionSamplerError as exc:
            raise TopoCAMError(f"[sampler.de]: {exc}") from None

    return build


@dataclass(frozen=True)
class SamplerKind:
    """How one named sampler is built."""

    build: Callable[[int, dict[str, Any]], BaseSampler]  # (seed, options) -> the sampler
    options: str | None = None  # the [sampler.X] table of options it reads; None: it takes none


# THE samplers (their order is the CLI's and the error messages').
SAMPLER_TABLE: dict[str, SamplerKind] = {
    "de": SamplerKind(_de(), options="de"),
    "de_immediate": SamplerKind(_de(updating="immediate"), options="de"),
    "tpe": SamplerKind(_per_trial(lambda s: optuna.samplers.TPESampler(seed=s))),
    "cmaes": SamplerKind(_per_trial(lambda s: optuna.samplers.CmaEsSampler(
        seed=s, independent_sampler=optuna.samplers.RandomSampler(seed=s), warn_independent_sampling=False))),
    "random": SamplerKind(_per_trial(lambda s: optuna.samplers.RandomSampler(seed=s))),
    "gp": SamplerKind(_per_trial(lambda s: optuna.samplers.GPSampler(seed=s))),
}
SAMPLERS: tuple[str, ...] = tuple(SAMPLER_TABLE)
SamplerChoice = choice_enum("SamplerChoice", SAMPLERS)  # the CLI's --sampler
OPTIONS_SECTION: dict[str, str] = {n: k.options for n, k in SAMPLER_TABLE.items() if k.options}  # sampler -> its [sampler.X]


def check_samplers(names, what: str = "sampler") -> tuple[str, ...]:
    """``names`` (one name or several) as a tuple of known sampler names, or a
    TopoCAMError that names ``what`` (the option or study-file key at fault)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    bad = [n for n in names if n not in SAMPLER_TABLE]
    if bad or not names:
        raise TopoCAMError(f"{what}: unknown sampler(s) {bad or list(names)}; choose from {', '.join(SAMPLER_TABLE)}")
    return names


def make_sampler(name: str, seed: int, options: dict[str, Any] | None = None) -> BaseSampler:
    check_samplers(name)
    kind = SAMPLER_TABLE[name]
    options = options or {}
    if options and kind.options is None:
        tables = [f"[sampler.{t}]" for t in dict.fromkeys(k.options for k in SAMPLER_TABLE.values() if k.options)]
        configurable = f"only {', '.join(tables)} {'is' if len(tables) == 1 else 'are'} configurable"
        raise TopoCAMError(f"sampler {name!r} takes no options (got {sorted(options)}); {configurable}")
    return kind.build(seed, options)
