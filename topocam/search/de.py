"""Differential evolution (scipy's algorithm) as an Optuna sampler, with its state in storage.

The sampler reproduces :func:`scipy.optimize.differential_evolution` (without the final
polishing step) inside Optuna:

* population size ``popsize_per_dim * D`` (at least 5), i.e. scipy's ``popsize=15`` is a
  per-dimension multiplier; an explicit ``popsize`` sets the total size;
* ``best1bin`` (default) or ``rand1bin`` mutation with binomial crossover; the mutation factor is
  dithered, drawn once per generation from ``U(0.5, 1)``; recombination 0.7; a trial coordinate
  that leaves ``[0, 1]`` is redrawn uniformly, as scipy does;
* Latin hypercube initialisation (scipy's ``init="latinhypercube"`` construction) or uniform;
* selection keeps a child when its value is ``<=`` the parent's (scipy's rule).

Two updating modes, as scipy's ``updating`` (the sampler's default is ``"deferred"``; scipy's is
``"immediate"``):

* ``"deferred"`` (*generational*): every trial of generation ``g`` is built from the population
  as it stood after generation ``g - 1``; selection happens once per generation.
* ``"immediate"``: a finished trial replaces its slot's member as soon as it is complete and
  ``<=``, so later trials of the same sweep already mutate from it (and from a newer best).
  Asynchronous: with several workers, trials that have not finished yet are simply not part of
  the population; no worker waits.

Both are resumable and run on several workers, because the population is never held in memory:
it is recomputed from the stored trials (see "State in storage").

Encoding
--------
Every parameter of the DE search space is one coordinate ``u`` in ``[0, 1]``:

* ``FloatDistribution``: linear map of ``[low, high]`` (of ``[log low, log high]`` when ``log``);
  with a ``step``, the grid points are equal-width bins of ``u``;
* ``IntDistribution``: ``n = (high - low) // step + 1`` equal-width bins,
  value ``low + step * min(floor(u * n), n - 1)``; with ``log`` the coordinate is linear in
  ``[log(low - 0.5), log(high + 0.5)]`` and the value is rounded (the same convention as
  Optuna's own transform), so every integer gets its log-width share;
* ``CategoricalDistribution``: choice ``min(floor(u * n_choices), n_choices - 1)``.

Encoding a value back (trials whose values were not produced by DE: the warm-up trial, enqueued
trials, trials from another sampler) maps ints and categoricals to the centre of their bin.

State in storage
----------------
No algorithm state lives in the sampler object. Everything is in the study's storage:

* study system attr ``"de:seed"``: the population seed. An explicit ``seed`` is recorded there;
  with ``seed=None`` a random seed is drawn once and stored, so every sampler instance (later
  processes, other workers) with ``seed=None`` continues the *same* population.
* study system attr ``"de:population"``: ``{"search_space": {name: distribution JSON},
  "popsize": N}``, fixed once, when the first trial completes (the intersection search space
  of the completed trials, single-valued distributions left out). Its order of names is the
  coordinate order.
* trial system attr ``"de"``: ``{"generation": g, "slot": i, "x": [u_1, ..., u_D] or None}``.

Generations and slots are a function of the trial number: trial ``n`` is slot ``n % N`` of
generation ``n // N`` (in immediate mode a generation is one sweep over the slots, as
in scipy's loop). Trial numbers are handed out atomically by the storage, so two workers
can never build the same slot, and a restarted process continues exactly where the previous
one stopped (with a fixed seed, a resumed sequential run reproduces an uninterrupted one
parameter for parameter).

* Generation 0 is the initial population: slot ``i`` gets row ``i`` of the Latin hypercube
  drawn from ``(seed, "init")``. The very first trial(s), run before any trial has completed,
  cannot know the search space (Optuna only learns it from finished trials); they are sampled
  independently and simply take their slot of generation 0 with the point they evaluated.
* Slot ``i``'s member (its vector in the population a trial mutates from) is the best COMPLETE
  trial among slot ``i``'s trials that count (ties go to the later trial number, i.e. scipy's
  ``<=`` in trial order). FAILED, PRUNED, still RUNNING and WAITING trials are losers (the
  member stays); a slot none of whose counted trials has completed keeps its initial vector
  with value ``+inf``. Which trials count is the only difference between the modes, for a
  trial of generation (sweep) ``g >= 1``:

  - ``"deferred"``: slot ``i``'s trials of generations ``0 .. g-1``. Sequentially this is
    exactly scipy's deferred selection.
  - ``"immediate"``: all of slot ``i``'s trials that have finished when the trial starts,
    whatever their generation. Sequentially (one worker, slots ``0 .. N-1`` in turn within each
    sweep) this is exactly scipy's immediate loop: slots ``< i`` already hold this sweep's
    selection, slots ``>= i`` the previous sweep's. scipy also swaps each new best into index
    0; members here stay in their slots, which only changes which member a later index of the
    sweep targets (same quality in ``benchmarks/de_vs_scipy.py``).

  In both modes ``best1bin``'s base vector is the best member of that population (the lowest
  slot on an exact tie; scipy keeps the earlier best, which differs only on exact ties).
* Asynchronous fallback (deferred): when a trial of generation ``g`` starts while some
  children of generation ``g - 1`` are still running on other workers, it is built from what
  is complete, the unfinished children counting as losers for that trial. Once they finish
  they do take part in the selection used by later trials. No worker ever waits. In immediate
  mode this is the rule itself rather than a fallback, so with several workers its
  trajectory depends on timing (which trials happened to be finished); sequentially, and on
  resume, it is a function of the seed.
* Randomness of slot ``i`` of generation ``g`` comes from ``(seed, g, i)`` and the mutation
  factor of generation ``g`` from ``(seed, g)`` in both modes; nothing depends on the order of
  calls, on the process, or on restarts.

* A trial lost with its worker and re-run under a new number (Optuna's retry callback copies
  its ``"de"`` record and names it in ``failed_trial``) is the evaluation of the lost trial's
  (generation, slot); the number the re-run occupies evaluates nothing (that slot's parent
  stays for that generation). So no evaluation is lost and no individual is duplicated.

Per-process caches (decoded search space, finished-trial vectors, populations of generations
whose trials have all finished) only memoise functions of immutable stored data; a pickled or
deep-copied sampler (Optuna's resume recipe pickles ``study.sampler``) leaves them and its lock
out and rebuilds them empty.

Parameters that are not in the relative search space (conditional parameters that appeared
after the space was fixed, or parameters whose distribution changes between trials) are
sampled by a :class:`~optuna.samplers.RandomSampler` seeded from
``(seed, trial number, parameter name)``.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import weakref
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from topocam.core.errors import TopoCAMError

__all__ = [
    "ATTR_POPULATION",
    "ATTR_SEED",
    "ATTR_TRIAL",
    "DifferentialEvolutionSampler",
    "DifferentialEvolutionSamplerError",
    "UPDATING_MODES",
    "decode_value",
    "encode_value",
]

_logger = logging.getLogger(__name__)

ATTR_SEED = "de:seed"
ATTR_POPULATION = "de:population"
ATTR_TRIAL = "de"

#: scipy's ``updating`` values, the sampler's default first.
UPDATING_MODES: tuple[str, ...] = ("deferred", "immediate")

# Domain-separation tags of the derived random streams.
_TAG_INIT = 0
_TAG_MUTATION = 1
_TAG_TRIAL = 2
_TAG_INDEPENDENT = 3

_SEED_MOD = 2**64


class DifferentialEvolutionSamplerError(TopoCAMError, ValueError):
    """Bad configuration of, or unsupported study for, :class:`DifferentialEvolutionSampler`."""


# --------------------------------------------------------------------------- encoding


def decode_value(u: float, dist: BaseDistribution) -> Any:
    """Value of the parameter whose encoded coordinate is ``u`` (clipped to ``[0, 1]``)."""
    u = min(max(float(u), 0.0), 1.0)
    if isinstance(dist, CategoricalDistribution):
        n = len(dist.choices)
        return dist.choices[min(int(math.floor(u * n)), n - 1)]
    if isinstance(dist, IntDistribution):
        if dist.log:
            lo, hi = math.log(dist.low - 0.5), math.log(dist.high + 0.5)
            value = int(round(math.exp(lo + u * (hi - lo))))
            return min(max(value, dist.low), dist.high)
        n = (dist.high - dist.low) // dist.step + 1
        return dist.low + min(int(math.floor(u * n)), n - 1) * dist.step
    if isinstance(dist, FloatDistribution):
        if dist.log:
            lo, hi = math.log(dist.low), math.log(dist.high)
            return float(min(max(math.exp(lo + u * (hi - lo)), dist.low), dist.high))
        if dist.step is not None:
            n = int(round((dist.high - dist.low) / dist.step)) + 1
            k = min(int(math.floor(u * n)), n - 1)
            return float(min(dist.low + k * dist.step, dist.high))
        return float(min(max(dist.low + u * (dist.high - dist.low), dist.low), dist.high))
    raise DifferentialEvolutionSamplerError(
        f"Unsupported distribution {dist!r}: DifferentialEvolutionSampler handles "
        "FloatDistribution, IntDistribution and CategoricalDistribution."
    )


def encode_value(value: Any, dist: BaseDistribution) -> float | None:
    """Coordinate in ``[0, 1]`` of ``value`` (bin centre for ints/categoricals).

    Values outside a numeric range are clipped; a categorical value that is not one of the
    choices gives ``None``.
    """
    try:
        if isinstance(dist, CategoricalDistribution):
            idx = dist.to_internal_repr(value)
            return (idx + 0.5) / len(dist.choices)
        if isinstance(dist, IntDistribution):
            v = float(value)
            if dist.log:
                lo, hi = math.log(dist.low - 0.5), math.log(dist.high + 0.5)
                u = (math.log(max(v, dist.low - 0.5)) - lo) / (hi - lo)
            else:
                n = (dist.high - dist.low) // dist.step + 1
                k = round((v - dist.low) / dist.step)
                u = (k + 0.5) / n
        elif isinstance(dist, FloatDistribution):
            v = float(value)
            if dist.log:
                lo, hi = math.log(dist.low), math.log(dist.high)
                u = 0.5 if hi == lo else (math.log(max(v, dist.low)) - lo) / (hi - lo)
            elif dist.step is not None:
                n = int(round((dist.high - dist.low) / dist.step)) + 1
                k = round((v - dist.low) / dist.step)
                u = (k + 0.5) / n
            else:
                span = dist.high - dist.low
                u = 0.5 if span == 0 else (v - dist.low) / span
        else:
            return None
    except (ValueError, TypeError):
        return None
    if not math.isfinite(u):
        return None
    return min(max(u, 0.0), 1.0)


def _same_value(a: Any, b: Any, dist: BaseDistribution) -> bool:
    try:
        return dist.to_internal_repr(a) == dist.to_internal_repr(b)
    except (ValueError, TypeError):
        return False


# --------------------------------------------------------------------------- per-study cache


class _StudyCache:
    """Memoised, immutable facts about one study's stored DE state (never the state itself)."""

    def __init__(self, storage: Any) -> None:
        try:
            self.storage_ref: Any = weakref.ref(storage)
        except TypeError:  # pragma: no cover - storages are ordinary objects
            self.storage_ref = lambda s=storage: s
        self.lock = threading.RLock()
        self.seed: int | None = None
        self.space: dict[str, BaseDistribution] | None = None
        self.popsize: int = 0
        self.init_pop: np.ndarray | None = None
        self.maximize: bool | None = None
        # Parameters of the stored space that some COMPLETE trial lacks or suggests with another
        # distribution (Optuna's intersection search space, computed incrementally).
        self.dropped: set[str] = set()
        self.scan_from = 0  # every trial numbered below this is finished and scanned
        self.scanned: set[int] = set()  # finished trials numbered >= scan_from already scanned
        self.mutation_factor: dict[int, float] = {}
        # trial_id -> (vector, score) for finished trials (immutable once finished).
        self.trial_memo: dict[int, tuple[np.ndarray, float]] = {}
        # generation j -> population after selection of generations 0..j, for the generations
        # whose trials (and all earlier ones) have all finished.
        self.final: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _seed_entropy(seed: int) -> int:
    return int(seed) % _SEED_MOD


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


def _trials_by_slot(by_number: list[FrozenTrial], n_pop: int) -> dict[tuple[int, int], list[FrozenTrial]]:
    """Trials by the (generation, slot) they evaluate, in number order: a trial's own number,
    except a re-run of a trial lost with its worker (Optuna's ``RetryHeartbeatStaleTrialCallback``
    marks it ``failed_trial`` and copies the lost trial's ``"de"`` record), which evaluates the
    lost trial's slot. The number a re-run occupies then evaluates nothing: its slot's parent
    stays for that generation."""
    out: dict[tuple[int, int], list[FrozenTrial]] = {}
    for t in by_number:
        key = divmod(t.number, n_pop)
        if t.system_attrs.get("failed_trial") is not None:
            rec = t.system_attrs.get(ATTR_TRIAL)
            key = (rec["generation"], rec["slot"]) if isinstance(rec, dict) else divmod(t.system_attrs["failed_trial"], n_pop)
        out.setdefault(key, []).append(t)
    return out


def _trials_by_number(study: optuna.Study) -> list[FrozenTrial]:
    """All trials of the study (unfiltered, no copies), position == trial number."""
    trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
    if trials and (trials[0].number != 0 or trials[-1].number != len(trials) - 1):
        trials = sorted(trials, key=lambda t: t.number)  # pragma: no cover - storages keep order
    return list(trials)


# --------------------------------------------------------------------------- sampler


class DifferentialEvolutionSampler(BaseSampler):
    """Differential evolution (deferred or immediate updating) whose whole state lives in storage.

    Args:
        popsize: Total population size ``N`` (at least 4). ``None``: ``popsize_per_dim * D``
            with a minimum of 5, where ``D`` is the number of DE parameters (scipy's rule).
        popsize_per_dim: scipy's ``popsize`` multiplier (15 by default).
        strategy: ``"best1bin"`` (scipy's default) or ``"rand1bin"``.
        mutation: Mutation factor ``F`` in ``(0, 2]``, or ``(low, high)`` for dithering: one
            ``F ~ U(low, high)`` per generation (scipy's default ``(0.5, 1)``).
        recombination: Crossover probability ``CR`` in ``[0, 1]``.
        seed: Population seed. ``None``: a random seed is drawn once per study and stored in
            the study, so resumed runs and other workers continue the same population.
        init: ``"latin"`` (Latin hypercube, default) or ``"random"`` initial population.
        updating: ``"deferred"`` (default: generational selection) or ``"immediate"``
            (scipy's default: a finished trial joins the population at once).

    See the module docstring for the encoding and the storage layout.
    """

    def __init__(
        self,
        *,
        popsize: int | None = None,
        popsize_per_dim: int = 15,
        strategy: Literal["rand1bin", "best1bin"] = "best1bin",
        mutation: float | tuple[float, float] = (0.5, 1.0),
        recombination: float = 0.7,
        seed: int | None = None,
        init: Literal["latin", "random"] = "latin",
        updating: Literal["deferred", "immediate"] = "deferred",
    ) -> None:
        if popsize is not None and (isinstance(popsize, bool) or int(popsize) != popsize or popsize < 4):
            raise DifferentialEvolutionSamplerError(
                f"popsize must be an integer >= 4 (mutation needs 3 members besides the target), "
                f"got {popsize!r}."
            )
        if isinstance(popsize_per_dim, bool) or int(popsize_per_dim) != popsize_per_dim or popsize_per_dim < 1:
            raise DifferentialEvolutionSamplerError(
                f"popsize_per_dim must be a positive integer, got {popsize_per_dim!r}."
            )
        if strategy not in ("best1bin", "rand1bin"):
            raise DifferentialEvolutionSamplerError(
                f"strategy must be 'best1bin' or 'rand1bin', got {strategy!r}."
            )
        if isinstance(mutation, Sequence) and not isinstance(mutation, str):
            if len(mutation) != 2:
                raise DifferentialEvolutionSamplerError(
                    f"mutation as a dithering range must be (low, high), got {mutation!r}."
                )
            lo, hi = float(mutation[0]), float(mutation[1])
            if not (0.0 <= lo < hi <= 2.0):
                raise DifferentialEvolutionSamplerError(
                    f"mutation dithering range must satisfy 0 <= low < high <= 2, got {mutation!r}."
                )
            self._mutation: float | tuple[float, float] = (lo, hi)
        else:
            f = float(mutation)
            if not (0.0 < f <= 2.0):
                raise DifferentialEvolutionSamplerError(
                    f"mutation must be in (0, 2], got {mutation!r}."
                )
            self._mutation = f
        if not (0.0 <= float(recombination) <= 1.0):
            raise DifferentialEvolutionSamplerError(
                f"recombination must be in [0, 1], got {recombination!r}."
            )
        if init not in ("latin", "random"):
            raise DifferentialEvolutionSamplerError(
                f"init must be 'latin' or 'random', got {init!r}."
            )
        if updating not in UPDATING_MODES:
            raise DifferentialEvolutionSamplerError(
                f"updating must be one of {', '.join(map(repr, UPDATING_MODES))}, got {updating!r}."
            )
        if seed is not None and (isinstance(seed, bool) or int(seed) != seed):
            raise DifferentialEvolutionSamplerError(f"seed must be an integer or None, got {seed!r}.")

        self._popsize = None if popsize is None else int(popsize)
        self._popsize_per_dim = int(popsize_per_dim)
        self._strategy = strategy
        self._recombination = float(recombination)
        self._seed = None if seed is None else int(seed)
        self._init = init
        self._updating = updating
        # Salt mixed into the independent fallback after reseed_rng(); None = reproducible.
        self._independent_salt: int | None = None
        self._lock = threading.Lock()
        self._caches: dict[tuple[int, int], _StudyCache] = {}
        self._warned: set[str] = set()

    @property
    def updating(self) -> str:
        """The updating mode (``"deferred"`` or ``"immediate"``), fixed at construction."""
        return self._updating

    # Optuna's resume recipe pickles ``study.sampler`` (and ``copy.deepcopy`` goes the same way):
    # the lock and the per-process caches are left out and rebuilt empty. The caches only memoise
    # functions of the stored state, so a copy proposes exactly what the original would.
    _PROCESS_LOCAL = ("_lock", "_caches")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._PROCESS_LOCAL}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._caches = {}

    # ------------------------------------------------------------------ Optuna interface

    def reseed_rng(self) -> None:
        """Reseed the independent fallback sampler.

        The DE part has no random state to reseed: the randomness of slot ``i`` of generation
        ``g`` is derived from ``(seed, g, i)`` and every trial has its own slot, so copies of
        the sampler (``n_jobs > 1``) never build the same candidate, and the population stays
        one coherent population across threads. The independent fallback (parameters outside
        the DE space) is seeded from ``(seed, trial number, name)``; after this call a fresh
        random salt is mixed in as well.
        """
        self._independent_salt = secrets.randbits(63)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        self._check_study(study)
        cache = self._cache(study)
        if not self._ensure_space(study, cache, allow_fix=True):
            return {}
        assert cache.space is not None
        dropped = self._scan_completed(study, cache)
        # Parameters whose distribution changed since the space was fixed (dynamic ranges) or
        # that stopped appearing in completed trials (conditional) go to the fallback sampler.
        return {name: d for name, d in cache.space.items() if name not in dropped}

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        self._check_study(study)
        if not search_space:
            return {}
        cache = self._cache(study)
        if not self._ensure_space(study, cache, allow_fix=False):  # pragma: no cover
            return {}
        assert cache.space is not None
        seed = self._population_seed(study, cache)
        generation, slot = divmod(trial.number, cache.popsize)
        x = self._candidate(study, cache, seed, generation, slot)
        study._storage.set_trial_system_attr(
            trial._trial_id,
            ATTR_TRIAL,
            {"generation": generation, "slot": slot, "x": [float(v) for v in x]},
        )
        return {
            name: decode_value(x[j], dist)
            for j, (name, dist) in enumerate(cache.space.items())
            if name in search_space
        }

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        self._check_study(study)
        cache = self._cache(study)
        seed = self._population_seed(study, cache)
        if cache.space is not None and param_name not in self._warned:
            self._warned.add(param_name)
            _logger.info(
                "Parameter %r of trial %d is sampled independently (RandomSampler): it is not "
                "in the differential-evolution search space (conditional or dynamic parameter).",
                param_name,
                trial.number,
            )
        entropy = [
            _seed_entropy(seed),
            _TAG_INDEPENDENT,
            trial.number,
            zlib.crc32(param_name.encode("utf-8")),
        ]
        if self._independent_salt is not None:
            entropy.append(self._independent_salt)
        sub_seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])
        return RandomSampler(seed=sub_seed).sample_independent(
            study, trial, param_name, param_distribution
        )

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        if study._is_multi_objective():
            return
        cache = self._cache(study)
        known = self._ensure_space(study, cache, allow_fix=False)
        if not known and state == TrialState.COMPLETE:
            # The first completed trial fixes the DE search space (and so the population size).
            known = self._fix_space(study, cache, extra=trial)
        if known and ATTR_TRIAL not in trial.system_attrs:
            # A trial that DE did not sample (warm-up, enqueued with all params fixed, ...)
            # still occupies its slot; record it for the bookkeeping. A re-run of a trial lost
            # before it was recorded evaluates the lost trial's slot (see _trials_by_slot).
            lost = trial.system_attrs.get("failed_trial")
            generation, slot = divmod(trial.number if lost is None else int(lost), cache.popsize)
            study._storage.set_trial_system_attr(
                trial._trial_id, ATTR_TRIAL, {"generation": generation, "slot": slot, "x": None}
            )

    # ------------------------------------------------------------------ study state

    def _check_study(self, study: optuna.Study) -> None:
        if study._is_multi_objective():
            raise DifferentialEvolutionSamplerError(
                "DifferentialEvolutionSampler supports single-objective studies only; this "
                f"study has {len(study.directions)} objectives. Use e.g. NSGAIISampler for "
                "multi-objective optimisation."
            )

    def _cache(self, study: optuna.Study) -> _StudyCache:
        storage = study._storage
        key = (id(storage), study._study_id)
        with self._lock:
            cache = self._caches.get(key)
            if cache is None or cache.storage_ref() is not storage:
                cache = _StudyCache(storage)
                self._caches[key] = cache
            return cache

    def _population_seed(self, study: optuna.Study, cache: _StudyCache) -> int:
        if cache.seed is not None:
            return cache.seed
        storage, sid = study._storage, study._study_id
        attrs = storage.get_study_system_attrs(sid)
        if self._seed is not None:
            if ATTR_SEED not in attrs:
                storage.set_study_system_attr(sid, ATTR_SEED, self._seed)
            elif attrs[ATTR_SEED] != self._seed:
                _logger.warning(
                    "Study %r records DE seed %s; this sampler uses its explicit seed %s.",
                    getattr(study, "study_name", "?"),
                    attrs[ATTR_SEED],
                    self._seed,
                )
            cache.seed = self._seed
            return cache.seed
        if ATTR_SEED not in attrs:
            storage.set_study_system_attr(sid, ATTR_SEED, secrets.randbits(63))
            attrs = storage.get_study_system_attrs(sid)  # adopt the last writer's seed
        cache.seed = int(attrs[ATTR_SEED])
        return cache.seed

    def population_size(self, n_dims: int) -> int:
        """The population this sampler builds for ``n_dims`` DE parameters (scipy's rule)."""
        if self._popsize is not None:
            return self._popsize
        return max(5, self._popsize_per_dim * max(1, n_dims))

    def _ensure_space(self, study: optuna.Study, cache: _StudyCache, *, allow_fix: bool) -> bool:
        if cache.space is not None:
            return True
        attrs = study._storage.get_study_system_attrs(study._study_id)
        if ATTR_POPULATION in attrs:
            self._load_space(study, cache, attrs[ATTR_POPULATION])
            return True
        if allow_fix:
            return self._fix_space(study, cache, extra=None)
        return False

    def _fix_space(self, study: optuna.Study, cache: _StudyCache, extra: FrozenTrial | None) -> bool:
        trials = list(
            study._storage.get_all_trials(
                study._study_id, deepcopy=False, states=(TrialState.COMPLETE,)
            )
        )
        if extra is not None:
            trials.append(extra)
        if not trials:
            return False
        space: dict[str, BaseDistribution] = dict(trials[0].distributions)
        for t in trials[1:]:
            space = {n: d for n, d in space.items() if t.distributions.get(n) == d}
        space = {n: space[n] for n in sorted(space) if not space[n].single()}
        if not space:
            return False
        record = {
            "search_space": {n: distribution_to_json(d) for n, d in space.items()},
            "popsize": self.population_size(len(space)),
        }
        storage, sid = study._storage, study._study_id
        if ATTR_POPULATION not in storage.get_study_system_attrs(sid):
            storage.set_study_system_attr(sid, ATTR_POPULATION, record)
        # Re-read: with concurrent workers the stored record (last writer) is the one in force.
        self._load_space(study, cache, storage.get_study_system_attrs(sid)[ATTR_POPULATION])
        return True

    def _load_space(self, study: optuna.Study, cache: _StudyCache, record: dict) -> None:
        with cache.lock:
            if cache.space is not None:
                return
            space = {n: json_to_distribution(s) for n, s in record["search_space"].items()}
            popsize = int(record["popsize"])
            wanted = self.population_size(len(space))
            if wanted != popsize:
                _logger.warning(
                    "Study records a DE population of %d; this sampler is configured for %d. "
                    "The stored size is kept so the study's generations stay consistent.",
                    popsize,
                    wanted,
                )
            seed = self._population_seed(study, cache)
            cache.init_pop = self._initial_population(seed, popsize, len(space))
            cache.popsize = popsize
            cache.maximize = study.direction == StudyDirection.MAXIMIZE
            cache.space = space

    def _scan_completed(self, study: optuna.Study, cache: _StudyCache) -> set[str]:
        """Update (incrementally) the parameters that leave the intersection search space."""
        assert cache.space is not None
        with cache.lock:
            trials = _trials_by_number(study)
            contiguous = True
            for t in trials[cache.scan_from :]:
                finished = t.state.is_finished()
                if finished and t.number not in cache.scanned:
                    if t.state == TrialState.COMPLETE:
                        for name, dist in cache.space.items():
                            if t.distributions.get(name) != dist:
                                cache.dropped.add(name)
                    cache.scanned.add(t.number)
                if contiguous and finished:
                    cache.scan_from = t.number + 1
                    cache.scanned.discard(t.number)
                else:
                    contiguous = False
            return set(cache.dropped)

    def _initial_population(self, seed: int, n: int, d: int) -> np.ndarray:
        rng = _rng(_seed_entropy(seed), _TAG_INIT)
        if self._init == "random":
            return rng.uniform(size=(n, d))
        # scipy's init_population_lhs: one point per stratum in every dimension.
        segsize = 1.0 / n
        samples = segsize * rng.uniform(size=(n, d)) + np.linspace(0.0, 1.0, n, endpoint=False)[
            :, np.newaxis
        ]
        pop = np.empty_like(samples)
        for j in range(d):
            pop[:, j] = samples[rng.permutation(n), j]
        return pop

    # ------------------------------------------------------------------ evolution

    def _candidate(
        self, study: optuna.Study, cache: _StudyCache, seed: int, generation: int, slot: int
    ) -> np.ndarray:
        assert cache.init_pop is not None
        if generation == 0:
            return cache.init_pop[slot].copy()
        pop, scores = self._parents(study, cache, generation)
        n, d = pop.shape
        s = _seed_entropy(seed)
        if isinstance(self._mutation, tuple):
            f = cache.mutation_factor.get(generation)
            if f is None:  # one dithered F per generation, as scipy
                f = float(_rng(s, _TAG_MUTATION, generation).uniform(*self._mutation))
                cache.mutation_factor[generation] = f
        else:
            f = self._mutation
        rng = _rng(s, _TAG_TRIAL, generation, slot)
        others = np.array([k for k in range(n) if k != slot])
        rng.shuffle(others)
        r0, r1, r2 = others[:3] if len(others) >= 3 else (others[0], others[1], others[0])
        if self._strategy == "best1bin":
            best = int(np.argmin(scores))
            mutant = pop[best] + f * (pop[r0] - pop[r1])
        else:
            mutant = pop[r0] + f * (pop[r1] - pop[r2])
        cross = rng.uniform(size=d) < self._recombination
        cross[int(rng.integers(d))] = True
        child = np.where(cross, mutant, pop[slot])
        outside = (child < 0.0) | (child > 1.0)
        if outside.any():
            child[outside] = rng.uniform(size=int(outside.sum()))
        return child

    def _parents(
        self, study: optuna.Study, cache: _StudyCache, generation: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Population (vectors, scores) that a trial of ``generation >= 1`` mutates from.

        The one place where the updating modes differ, and only in which trials count:
        deferred selects over the earlier generations, immediate over every finished trial
        (``upto=None``), so a child that finished a moment ago is already a member.
        """
        if self._updating == "deferred":
            return self._population(study, cache, generation - 1)
        return self._population(study, cache, None)

    def _population(
        self, study: optuna.Study, cache: _StudyCache, upto: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-slot best COMPLETE trial over generations ``0..upto`` (``None``: all stored).

        Trials are folded in number order with scipy's ``<=``, so ties go to the later trial;
        unfinished trials are skipped (see module docstring). Folds of generations whose trials
        (and all earlier ones) have finished are immutable and memoised in ``cache.final``.
        """
        assert cache.init_pop is not None
        with cache.lock:
            if upto is not None and upto in cache.final:
                pop, scores = cache.final[upto]
                return pop.copy(), scores.copy()
            by_number = _trials_by_number(study)
            n_pop = cache.popsize
            if upto is None:
                upto = (len(by_number) - 1) // n_pop
                if upto in cache.final:
                    pop, scores = cache.final[upto]
                    return pop.copy(), scores.copy()
            done = [k for k in cache.final if k < upto]
            start = max(done) if done else -1
            if start >= 0:
                pop, scores = (a.copy() for a in cache.final[start])
            else:
                pop = cache.init_pop.copy()
                scores = np.full(cache.popsize, np.inf)
            all_finished = True
            members = _trials_by_slot(by_number, n_pop)
            for gen in range(start + 1, upto + 1):
                for slot in range(n_pop):
                    evaluations = members.get((gen, slot), [])
                    if not evaluations and gen * n_pop + slot >= len(by_number):
                        all_finished = False  # not created yet
                    for t in evaluations:
                        if not t.state.is_finished():
                            all_finished = False
                            continue
                        if t.state != TrialState.COMPLETE:
                            continue  # FAIL / PRUNED: loser, the parent stays
                        vec, score = self._trial_point(cache, t, slot)
                        if score <= scores[slot]:
                            pop[slot] = vec
                            scores[slot] = score
                if all_finished:
                    cache.final[gen] = (pop.copy(), scores.copy())
            return pop, scores

    def _trial_point(
        self, cache: _StudyCache, trial: FrozenTrial, slot: int
    ) -> tuple[np.ndarray, float]:
        """Encoded vector and (minimisation) score of a finished trial, memoised."""
        memo = cache.trial_memo.get(trial._trial_id)
        if memo is not None:
            return memo
        assert cache.space is not None and cache.init_pop is not None
        rec = trial.system_attrs.get(ATTR_TRIAL)
        x = rec.get("x") if isinstance(rec, dict) else None
        d = len(cache.space)
        has_x = x is not None and len(x) == d
        vec = np.asarray(x, dtype=float) if has_x else cache.init_pop[slot].copy()
        for j, (name, dist) in enumerate(cache.space.items()):
            if name not in trial.params:
                continue  # inactive conditional parameter: keep the coordinate
            value = trial.params[name]
            if has_x and _same_value(decode_value(vec[j], dist), value, dist):
                continue  # DE produced this value: keep the exact continuous coordinate
            u = encode_value(value, dist)
            if u is not None:
                vec[j] = u
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            score = -float(trial.value) if cache.maximize else float(trial.value)
        else:
            score = math.inf
        cache.trial_memo[trial._trial_id] = (vec, score)
        return vec, score
