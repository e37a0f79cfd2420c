"""DifferentialEvolutionSampler: quality vs scipy, resume, two workers, domains, errors.

Quality tolerance (test_comparable_with_scipy_and_beats_random)
--------------------------------------------------------------
Each updating mode is compared with scipy's run in the same mode (``updating="deferred"``,
the sampler's default, and ``"immediate"``, scipy's default): ``log10(best value)`` medians
over 5 seeds at the same number of evaluations (``popsize * (maxiter + 1)``, scipy with
``polish=False, tol=0``):

* The algorithm is the same: test_sampler_is_exactly_scipys_loop checks candidate for
  candidate against a NumPy loop of either mode; only the random streams differ from scipy's.
* Calibration (12 seeds per problem, 3-6 dimensions, ~1000-1900 evaluations): the run-to-run
  standard deviation of ``log10(best)`` is 0.1-0.6 decade for both implementations, and their
  12-seed medians differ by 0.03-0.28 decade (on 6-D Rosenbrock with 120 seeds, the mean
  ``log10`` values agree within 0.01). The median of 5 runs has a standard deviation of about
  ``1.25 * 0.6 / sqrt(5) ~= 0.35`` decade, the difference of two such medians ``~0.5``: a
  tolerance of **1 decade** is 2 standard deviations, while a broken DE (wrong selection,
  direction or encoding) lands on the random-search level, 1-4 decades away.
* The same 1-decade tolerance holds for immediate mode against scipy's immediate mode (30
  seeds of 4-D sphere: mean ``log10`` -2.43 ours, -2.32 scipy; sd 0.4-0.55 decade). Immediate
  converges faster than deferred (0.4-0.9 decade here); deferred only has to stay within
  1.5 decades of scipy's immediate mode.
* "Clearly better than random": the median must be at least 0.75 decade (5.6x) below
  RandomSampler's on the same budget (measured 1-3 decades).

All runs are seeded, so the outcome is deterministic.
"""

from __future__ import annotations

import gc
import math
import multiprocessing as mp
import os
import sqlite3
import time
from collections import Counter

import numpy as np
import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from benchmarks.functions import FUNCTIONS, rosenbrock, sphere
from topocam.core.errors import TopoCAMError
from topocam.search.de import (
    ATTR_POPULATION,
    ATTR_SEED,
    ATTR_TRIAL,
    UPDATING_MODES,
    DifferentialEvolutionSampler,
    DifferentialEvolutionSamplerError,
    decode_value,
    encode_value,
)
from topocam.search.samplers import make_sampler
from topocam.search.studyfile import load_study


@pytest.fixture(autouse=True)
def _quiet_optuna():
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(old)


def _box_objective(f, dim, lo, hi):
    def objective(trial: optuna.Trial) -> float:
        return f([trial.suggest_float(f"x{i}", lo, hi) for i in range(dim)])

    return objective


def _optuna_best(f, dim, lo, hi, sampler, n_trials) -> float:
    study = optuna.create_study(sampler=sampler)
    study.optimize(_box_objective(f, dim, lo, hi), n_trials=n_trials)
    return study.best_value


def _study_attrs(study) -> dict:
    # Optuna 5 has no public Study.system_attrs; the storage API is the documented way.
    return study._storage.get_study_system_attrs(study._study_id)


def _median_log10(values) -> float:
    return float(np.median(np.log10(np.maximum(np.asarray(values, dtype=float), 1e-300))))


# --------------------------------------------------------------------------- quality


@pytest.mark.parametrize(
    ("name", "dim", "generations"),
    [("sphere", 4, 15), ("rosenbrock", 3, 20), ("ackley", 3, 20)],
)
def test_comparable_with_scipy_and_beats_random(name, dim, generations):
    from scipy.optimize import differential_evolution  # lazy: keeps spawned workers light

    f, (lo, hi) = FUNCTIONS[name]
    popsize = 15 * dim  # scipy's popsize=15 is per dimension
    n_trials = popsize * (generations + 1)
    ours, ours_imm, deferred, immediate, random = [], [], [], [], []
    for seed in range(5):
        ours.append(_optuna_best(f, dim, lo, hi, DifferentialEvolutionSampler(seed=seed), n_trials))
        ours_imm.append(_optuna_best(
            f, dim, lo, hi, DifferentialEvolutionSampler(seed=seed, updating="immediate"), n_trials
        ))
        for mode, out in (("deferred", deferred), ("immediate", immediate)):
            res = differential_evolution(
                f, [(lo, hi)] * dim, popsize=15, maxiter=generations, polish=False,
                tol=0, atol=0, seed=seed, updating=mode,
            )
            assert res.nfev == n_trials
            out.append(res.fun)
        random.append(
            _optuna_best(f, dim, lo, hi, optuna.samplers.RandomSampler(seed=seed), n_trials)
        )
    m_ours, m_ours_imm, m_def, m_imm, m_rand = map(
        _median_log10, (ours, ours_imm, deferred, immediate, random)
    )
    msg = (
        f"{name} d={dim} n={n_trials}: median log10 best: ours deferred {m_ours:.2f}, ours "
        f"immediate {m_ours_imm:.2f}, scipy deferred {m_def:.2f}, scipy immediate {m_imm:.2f}, "
        f"random {m_rand:.2f}"
    )
    assert abs(m_ours - m_def) <= 1.0, msg
    assert abs(m_ours_imm - m_imm) <= 1.0, msg
    assert m_ours <= m_imm + 1.5, msg
    assert max(m_ours, m_ours_imm) <= m_rand - 0.75, msg


def _stream(*entropy):
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


def _child(pop, scores, seed, g, i):
    """best1bin child of slot ``i`` in generation (sweep) ``g``, from population ``pop``.

    scipy's mutation and binomial crossover with the sampler's streams: ``(seed, 1, g)`` the
    dithered factor of generation g, ``(seed, 2, g, i)`` slot i of generation g.
    """
    n, dim = pop.shape
    factor = _stream(seed, 1, g).uniform(0.5, 1.0)
    r = _stream(seed, 2, g, i)
    others = np.array([k for k in range(n) if k != i])
    r.shuffle(others)
    mutant = pop[int(np.argmin(scores))] + factor * (pop[others[0]] - pop[others[1]])
    cross = r.uniform(size=dim) < 0.7
    cross[int(r.integers(dim))] = True
    kid = np.where(cross, mutant, pop[i])
    out = (kid < 0) | (kid > 1)
    kid[out] = r.uniform(size=int(out.sum()))
    return kid


def _reference_de(f, dim, lo, hi, popsize, generations, seed, first_point, updating):
    """Plain NumPy best1bin DE, scipy's loop for either ``updating`` mode.

    Initial population: Latin hypercube from stream ``(seed, 0)``, slot 0 replaced by the
    warm-up point. ``"deferred"``: all children of a generation are built from the population
    before it, selection afterwards. ``"immediate"``: slots 0..N-1 in turn, each child is
    evaluated and replaces its target at once when ``<=`` (so later slots, and ``best``, see it).
    Returns every evaluated vector in trial order.
    """
    r = _stream(seed, 0)
    samples = r.uniform(size=(popsize, dim)) / popsize + np.linspace(0, 1, popsize, endpoint=False)[:, None]
    pop = np.empty_like(samples)
    for j in range(dim):
        pop[:, j] = samples[r.permutation(popsize), j]
    pop[0] = first_point
    scores = np.array([f(lo + p * (hi - lo)) for p in pop])
    history = [pop.copy()]
    for g in range(1, generations + 1):
        kids = np.empty_like(pop)
        for i in range(popsize):
            kids[i] = _child(pop, scores, seed, g, i)
            if updating == "immediate":
                score = f(lo + kids[i] * (hi - lo))
                if score <= scores[i]:
                    pop[i], scores[i] = kids[i], score
        history.append(kids.copy())
        if updating == "deferred":
            kid_scores = np.array([f(lo + k * (hi - lo)) for k in kids])
            better = kid_scores <= scores
            pop[better], scores[better] = kids[better], kid_scores[better]
    return np.concatenate(history)


@pytest.mark.parametrize("updating", UPDATING_MODES)
def test_sampler_is_exactly_scipys_loop(updating):
    """Sequentially, the sampler *is* scipy's best1bin DE in either mode, candidate for candidate."""
    dim, popsize, generations, seed, (lo, hi) = 3, 10, 6, 21, FUNCTIONS["rosenbrock"][1]
    study = optuna.create_study(
        sampler=DifferentialEvolutionSampler(popsize=popsize, seed=seed, updating=updating)
    )
    study.optimize(_box_objective(rosenbrock, dim, lo, hi), n_trials=popsize * (generations + 1))
    ours = np.array([[(t.params[f"x{i}"] - lo) / (hi - lo) for i in range(dim)] for t in study.trials])
    expected = _reference_de(rosenbrock, dim, lo, hi, popsize, generations, seed, ours[0], updating)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    # The two modes are different searches here, so matching one's loop excludes the other's.
    other = "immediate" if updating == "deferred" else "deferred"
    other_seq = _reference_de(rosenbrock, dim, lo, hi, popsize, generations, seed, ours[0], other)
    assert not np.allclose(other_seq, expected, rtol=0, atol=1e-6)
    assert np.allclose(other_seq[: popsize + 1], expected[: popsize + 1])  # they part in sweep 1


def _vector(trial, dist, dim):
    """The encoded point of a trial: DE's stored vector, or its parameters encoded."""
    x = trial.system_attrs[ATTR_TRIAL]["x"]
    if x is not None:
        return np.array(x)
    return np.array([encode_value(trial.params[f"x{i}"], dist) for i in range(dim)])


@pytest.mark.parametrize("updating", UPDATING_MODES)
def test_unfinished_trials_join_the_population_when_they_finish(updating):
    """Asynchronous sweep (ask/tell): trial 6 starts while trial 5 runs, trial 7 after 5 ended.

    Immediate: 5 is no member for 6, but is (slot 0's member and the new best) for 7.
    Deferred: both build from generation 0, whatever has finished since.
    """
    popsize, dim, seed, dist = 5, 2, 3, FloatDistribution(-5.0, 5.0)
    study = optuna.create_study(
        sampler=DifferentialEvolutionSampler(popsize=popsize, seed=seed, updating=updating)
    )
    study.optimize(_box_objective(sphere, dim, -5.0, 5.0), n_trials=popsize)  # generation 0

    def ask():
        trial = study.ask()
        for i in range(dim):
            trial.suggest_float(f"x{i}", -5.0, 5.0)  # samples the DE candidate now
        return trial

    t5 = ask()
    t6 = ask()  # trial 5 is still running
    study.tell(t5, -1.0)  # below every sphere value: accepted, and the best
    t7 = ask()
    study.tell(t6, 50.0)
    study.tell(t7, 50.0)

    trials = study.trials
    gen0 = np.array([_vector(t, dist, dim) for t in trials[:popsize]])
    scores0 = np.array([t.value for t in trials[:popsize]])
    with_5, scores_5 = gen0.copy(), scores0.copy()
    with_5[0], scores_5[0] = _vector(trials[5], dist, dim), -1.0
    assert trials[5].system_attrs[ATTR_TRIAL]["slot"] == 0
    np.testing.assert_allclose(_vector(trials[6], dist, dim), _child(gen0, scores0, seed, 1, 1),
                               rtol=0, atol=1e-12)
    without = _child(gen0, scores0, seed, 1, 2)
    joined = _child(with_5, scores_5, seed, 1, 2)
    assert not np.allclose(without, joined)  # the check below can tell the modes apart
    expected = joined if updating == "immediate" else without
    np.testing.assert_allclose(_vector(trials[7], dist, dim), expected, rtol=0, atol=1e-12)


def test_same_seed_same_sequence_and_directions_agree():
    def run(seed, direction="minimize"):
        sign = -1.0 if direction == "maximize" else 1.0
        study = optuna.create_study(
            direction=direction, sampler=DifferentialEvolutionSampler(popsize=8, seed=seed)
        )
        study.optimize(lambda t: sign * sphere([t.suggest_float("a", -2, 2),
                                                t.suggest_float("b", -2, 2)]), n_trials=40)
        return [t.params for t in study.trials], study

    first, _ = run(3)
    again, _ = run(3)
    other, _ = run(4)
    assert first == again
    assert first != other
    # Maximising -f is the same search as minimising f: identical parameter sequence.
    maxed, study = run(3, "maximize")
    assert maxed == first
    assert study.best_value > -0.5  # and it did go up


# --------------------------------------------------------------------------- resume


def _mixed_objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -3.0, 3.0)
    lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
    n = trial.suggest_int("n", 0, 20, step=2)
    c = trial.suggest_categorical("c", ["a", "b", "c"])
    return (x - 1.0) ** 2 + (math.log10(lr) + 2.0) ** 2 + abs(n - 8) / 4 + {"a": 1.0, "b": 0.0, "c": 2.0}[c]


def _signature(study):
    return [
        (t.number, t.params, t.value, t.system_attrs.get(ATTR_TRIAL))
        for t in sorted(study.trials, key=lambda t: t.number)
    ]


@pytest.mark.parametrize("updating", UPDATING_MODES)
def test_resume_reproduces_uninterrupted_run(tmp_path, updating):
    url = f"sqlite:///{tmp_path / 'resume.db'}"
    first, more = 11, 9  # popsize 8: stop in the middle of generation (sweep) 1

    def sampler():
        return DifferentialEvolutionSampler(popsize=8, seed=11, updating=updating)

    study = optuna.create_study(storage=url, study_name="de", sampler=sampler())
    study.optimize(_mixed_objective, n_trials=first)
    del study
    gc.collect()

    resumed = optuna.load_study(study_name="de", storage=url, sampler=sampler())
    resumed.optimize(_mixed_objective, n_trials=more)

    reference = optuna.create_study(sampler=sampler())
    reference.optimize(_mixed_objective, n_trials=first + more)

    assert _signature(resumed) == _signature(reference)  # exact: params, values and DE records
    gens = Counter(t.system_attrs[ATTR_TRIAL]["generation"] for t in resumed.trials)
    assert gens == {0: 8, 1: 8, 2: 4}


@pytest.mark.parametrize("updating", UPDATING_MODES)
def test_pickled_or_deep_copied_mid_study_the_sampler_proposes_what_the_original_does(tmp_path, updating):
    """Optuna's resume recipe pickles ``study.sampler``; its locks and per-process caches are
    left out and rebuilt, so the copy carries on from the stored state exactly as the original."""
    import copy
    import pickle
    import shutil

    url = lambda name: f"sqlite:///{tmp_path / name}"  # noqa: E731
    study = optuna.create_study(storage=url("a.db"), study_name="de",
                                sampler=DifferentialEvolutionSampler(popsize=6, updating=updating))  # seed drawn, stored
    study.optimize(_mixed_objective, n_trials=9)  # mid generation 1: the caches hold the space, seed, populations
    pickled = pickle.loads(pickle.dumps(study.sampler))
    copied = copy.deepcopy(study.sampler)
    for name in ("b.db", "c.db"):
        shutil.copy(tmp_path / "a.db", tmp_path / name)
    study.optimize(_mixed_objective, n_trials=8)
    assert len(study.trials) == 17
    for name, sampler in (("b.db", pickled), ("c.db", copied)):
        assert type(sampler) is DifferentialEvolutionSampler and sampler.updating == updating
        twin = optuna.load_study(study_name="de", storage=url(name), sampler=sampler)
        twin.optimize(_mixed_objective, n_trials=8)
        assert _signature(twin) == _signature(study)  # the same next parameters, values and DE records
    pickle.loads(pickle.dumps(study.sampler))  # and again after use


def test_resume_with_seed_none_continues_the_stored_population(tmp_path):
    url = f"sqlite:///{tmp_path / 'noseed.db'}"
    study = optuna.create_study(
        storage=url, study_name="de", sampler=DifferentialEvolutionSampler(popsize=10)
    )
    study.optimize(_mixed_objective, n_trials=6)
    del study
    gc.collect()
    resumed = optuna.load_study(
        study_name="de", storage=url, sampler=DifferentialEvolutionSampler(popsize=10)
    )
    resumed.optimize(_mixed_objective, n_trials=9)
    attrs = _study_attrs(resumed)
    seed = attrs[ATTR_SEED]
    assert attrs[ATTR_POPULATION]["popsize"] == 10
    # The second sampler adopted the stored seed: identical to one run with that seed ...
    reference = optuna.create_study(sampler=DifferentialEvolutionSampler(popsize=10, seed=seed))
    reference.optimize(_mixed_objective, n_trials=15)
    assert _signature(resumed) == _signature(reference)
    # ... so generation 0 is one Latin hypercube across the restart (slot 0 is the warm-up).
    xs = np.array([t.system_attrs[ATTR_TRIAL]["x"] for t in resumed.trials[1:10]])
    for j in range(xs.shape[1]):
        strata = np.floor(xs[:, j] * 10).astype(int)
        assert len(set(strata)) == 9


# --------------------------------------------------------------------------- parallel workers


def _slow_sphere(trial: optuna.Trial) -> float:
    trial.set_user_attr("worker", os.getpid())
    value = sphere([trial.suggest_float(f"x{i}", -5.0, 5.0) for i in range(2)])
    time.sleep(0.003)  # let the two workers interleave
    return value


def _worker(url: str, study_name: str, n_trials: int, updating: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}})
    study = optuna.load_study(
        study_name=study_name, storage=storage,
        sampler=DifferentialEvolutionSampler(popsize=6, seed=5, updating=updating),
    )
    study.optimize(_slow_sphere, n_trials=n_trials)


@pytest.mark.parametrize("updating", UPDATING_MODES)
def test_two_worker_processes_share_one_population(tmp_path, updating):
    url = f"sqlite:///{tmp_path / 'workers.db'}"
    popsize, generations = 6, 5
    total = popsize * generations
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}})
    optuna.create_study(storage=storage, study_name="par")
    # WAL journal (persistent in the file): readers don't block the writer, fewer fsyncs.
    with sqlite3.connect(tmp_path / "workers.db") as con:
        con.execute("PRAGMA journal_mode=WAL")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(url, "par", total // 2, updating)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    study = optuna.load_study(study_name="par", storage=storage)
    trials = study.trials
    assert len(trials) == total
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers took part
    records = [t.system_attrs[ATTR_TRIAL] for t in trials]
    slots = [(r["generation"], r["slot"]) for r in records]
    assert len(set(slots)) == len(slots)  # no slot built twice
    assert set(slots) == {(g, i) for g in range(generations) for i in range(popsize)}
    for t, r in zip(trials, records):
        assert (r["generation"], r["slot"]) == divmod(t.number, popsize)
    vectors = [tuple(np.round(_vector(t, FloatDistribution(-5.0, 5.0), 2), 12)) for t in trials]
    assert len(set(vectors)) == len(vectors)  # no candidate evaluated twice
    gen0 = [t.value for t in trials if t.number < popsize]
    assert study.best_value < min(gen0)
    # The population (best trial of every slot) improved on generation 0 as a whole.
    slot_best = [min(t.value for t in trials if t.number % popsize == i) for i in range(popsize)]
    assert np.median(slot_best) < np.median(gen0)


@pytest.mark.parametrize("updating", UPDATING_MODES)
def test_threads_with_n_jobs_share_one_population(updating):
    sampler = DifferentialEvolutionSampler(popsize=10, seed=2, updating=updating)
    study = optuna.create_study(sampler=sampler)
    study.optimize(_box_objective(sphere, 2, -5, 5), n_trials=80, n_jobs=2)
    slots = [(t.system_attrs[ATTR_TRIAL]["generation"], t.system_attrs[ATTR_TRIAL]["slot"])
             for t in study.trials]
    assert sorted(slots) == [(g, i) for g in range(8) for i in range(10)]
    gen0 = min(t.value for t in study.trials if t.number < 10)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.best_value < gen0


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize("updating", UPDATING_MODES)
def test_failed_and_pruned_trials_lose_and_parents_are_slot_bests(updating):
    """With recombination 0 a child equals its parent except at one coordinate.

    So each child of generation g must differ in at most one coordinate from the best
    COMPLETE trial of its slot over generations < g (ties: the later one); FAILED and PRUNED
    trials never become parents. Sequentially these are also all of the slot's finished
    trials, so the rule is the same in immediate mode.
    """
    popsize, dim = 6, 3

    def objective(trial):
        value = sphere([trial.suggest_float(f"x{i}", -4, 4) for i in range(dim)])
        if trial.number % 5 == 2:
            raise RuntimeError("boom")
        if trial.number % 7 == 3:
            raise optuna.TrialPruned()
        return value

    study = optuna.create_study(
        sampler=DifferentialEvolutionSampler(
            popsize=popsize, recombination=0.0, seed=9, updating=updating
        )
    )
    study.optimize(objective, n_trials=popsize * 10, catch=(RuntimeError,))
    trials = study.trials
    states = Counter(t.state for t in trials)
    assert states[TrialState.FAIL] > 0 and states[TrialState.PRUNED] > 0

    def vec(t):
        return _vector(t, FloatDistribution(-4, 4), dim)

    checked = 0
    for t in trials[popsize:]:
        g, i = divmod(t.number, popsize)
        history = [trials[k * popsize + i] for k in range(g)]
        complete = [h for h in history if h.state == TrialState.COMPLETE]
        if not complete:
            continue
        best = min(complete, key=lambda h: (h.value, -h.number))
        diff = np.count_nonzero(~np.isclose(vec(t), vec(best), rtol=0, atol=1e-12))
        assert diff <= 1, (t.number, best.number)
        checked += 1
    assert checked > 30


# --------------------------------------------------------------------------- domains


CHOICES = ["relu", None, 3, 2.5]


def _domain_objective(trial: optuna.Trial) -> float:
    n = trial.suggest_int("n", -7, 20, step=3)
    k = trial.suggest_int("k", 1, 1000, log=True)
    lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
    q = trial.suggest_float("q", 0.0, 1.0, step=0.25)
    c = trial.suggest_categorical("c", CHOICES)
    extra = 0.0
    if c == "relu":  # conditional parameter
        extra = trial.suggest_float("alpha", 0.0, 1.0)
    # dynamic range: a different distribution every trial -> independent fallback
    dyn = trial.suggest_float("dyn", 0.0, 1.0 + trial.number)
    return (n - 5) ** 2 + (math.log10(k) - 2) ** 2 + (math.log10(lr) + 3) ** 2 + q + extra + 0 * dyn + (
        0.0 if c == 3 else 1.0
    )


def test_int_categorical_and_log_parameters_stay_in_domain():
    popsize = 20
    sampler = DifferentialEvolutionSampler(popsize=popsize, seed=1)
    study = optuna.create_study(sampler=sampler)
    study.optimize(_domain_objective, n_trials=popsize * 8)
    space = {n: optuna.distributions.json_to_distribution(s)
             for n, s in _study_attrs(study)[ATTR_POPULATION]["search_space"].items()}
    # The space was fixed from trial 0; the dynamic "dyn" (and "alpha", once a trial without it
    # completed) then left the relative space and went to the independent fallback.
    assert {"n", "k", "lr", "q", "c"} <= set(space)
    relative = sampler.infer_relative_search_space(study, study.trials[-1])
    assert set(relative) == {"n", "k", "lr", "q", "c"}
    for t in study.trials:
        p = t.params
        assert p["n"] in range(-7, 21, 3)
        assert isinstance(p["k"], int) and 1 <= p["k"] <= 1000
        assert 1e-5 <= p["lr"] <= 1e-1
        assert p["q"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert p["c"] in CHOICES
        if p["c"] == "relu":
            assert 0.0 <= p["alpha"] <= 1.0
        assert 0.0 <= p["dyn"] <= 1.0 + t.number
        rec = t.system_attrs[ATTR_TRIAL]
        if rec["x"] is not None:  # what was evaluated is the decoding of the stored vector
            for j, name in enumerate(space):
                if name in relative:
                    assert decode_value(rec["x"][j], space[name]) == p[name]
    # Log scale: the Latin hypercube of generation 0 is uniform in log10(lr), not in lr.
    lrs = np.log10([t.params["lr"] for t in study.trials[1:popsize]])
    counts = np.histogram(lrs, bins=4, range=(-5, -1))[0]
    assert counts.min() >= 4  # 19 points, about 5 per decade
    assert min(t.value for t in study.trials[-popsize:]) < min(t.value for t in study.trials[:popsize])


def test_categorical_and_int_encoding_bins():
    cat = CategoricalDistribution(["a", "b", "c"])
    assert [decode_value(u, cat) for u in (0.0, 0.33, 0.34, 0.66, 0.67, 1.0)] == [
        "a", "a", "b", "b", "c", "c"]
    ints = IntDistribution(0, 10, step=5)
    assert [decode_value(u, ints) for u in (0.0, 0.3, 0.34, 0.99, 1.0)] == [0, 0, 5, 10, 10]
    logf = FloatDistribution(1e-3, 1e3, log=True)
    assert decode_value(0.5, logf) == pytest.approx(1.0)
    assert encode_value(10.0, logf) == pytest.approx(4 / 6)


DISTRIBUTIONS = [
    FloatDistribution(-2.0, 3.0),
    FloatDistribution(1e-6, 1e2, log=True),
    FloatDistribution(0.1, 0.9, step=0.2),
    IntDistribution(-5, 17),
    IntDistribution(-4, 20, step=4),
    IntDistribution(1, 4096, log=True),
    CategoricalDistribution(["x", None, 1, 2.5, True]),
]


@settings(max_examples=200, deadline=None)
@given(u=st.floats(-0.5, 1.5, allow_nan=False), which=st.integers(0, len(DISTRIBUTIONS) - 1))
def test_decode_is_in_domain_and_encode_round_trips(u, which):
    dist = DISTRIBUTIONS[which]
    value = decode_value(u, dist)
    assert dist._contains(dist.to_internal_repr(value))
    back = encode_value(value, dist)
    assert back is not None and 0.0 <= back <= 1.0
    if isinstance(dist, FloatDistribution) and dist.step is None:
        assert decode_value(back, dist) == pytest.approx(value, rel=1e-9, abs=1e-12)
    else:
        assert decode_value(back, dist) == value


# --------------------------------------------------------------------------- misc


def test_reseed_rng_only_touches_the_independent_fallback():
    def params(sampler):
        study = optuna.create_study(sampler=sampler)
        study.optimize(_box_objective(sphere, 2, -1, 1), n_trials=8)
        return [t.params for t in study.trials]

    plain = params(DifferentialEvolutionSampler(popsize=8, seed=4))
    reseeded_sampler = DifferentialEvolutionSampler(popsize=8, seed=4)
    reseeded_sampler.reseed_rng()
    reseeded = params(reseeded_sampler)
    assert plain[0] != reseeded[0]  # warm-up trial: independent sampler, reseeded
    assert plain[1:] == reseeded[1:]  # generation 0 (Latin hypercube) keeps the population seed


def test_multi_objective_study_is_rejected():
    study = optuna.create_study(
        directions=["minimize", "maximize"], sampler=DifferentialEvolutionSampler(seed=0)
    )
    with pytest.raises(DifferentialEvolutionSamplerError, match="single-objective studies only; this study has 2 objectives"):
        study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=1)
    assert [t.state for t in study.trials] == [TrialState.FAIL]  # closed, not left RUNNING in the storage


@pytest.mark.parametrize(
    "kwargs",
    [
        {"popsize": 3},
        {"popsize_per_dim": 0},
        {"strategy": "best2bin"},
        {"mutation": (1.0, 0.5)},
        {"mutation": 2.5},
        {"recombination": 1.5},
        {"init": "sobol"},
        {"updating": "sometimes"},
    ],
)
def test_bad_configuration_is_rejected(kwargs):
    with pytest.raises(DifferentialEvolutionSamplerError):
        DifferentialEvolutionSampler(**kwargs)


def test_population_size_follows_scipy_rule():
    study = optuna.create_study(sampler=DifferentialEvolutionSampler(seed=0))
    study.optimize(_box_objective(sphere, 4, -1, 1), n_trials=2)
    assert _study_attrs(study)[ATTR_POPULATION]["popsize"] == 60
    study = optuna.create_study(sampler=DifferentialEvolutionSampler(seed=0, popsize_per_dim=1))
    study.optimize(_box_objective(sphere, 2, -1, 1), n_trials=2)
    assert _study_attrs(study)[ATTR_POPULATION]["popsize"] == 5  # scipy's minimum


# --------------------------------------------------------------------------- study files


def _study_file(tmp_path, de_table: str):
    path = tmp_path / "de.toml"
    path.write_text(f'[study]\nname = "de"\nsamplers = ["de"]\n\n[sampler.de]\n{de_table}\n')
    return path


@pytest.mark.parametrize("updating", UPDATING_MODES)
def test_study_file_sets_the_updating_mode(tmp_path, updating):
    spec = load_study(_study_file(tmp_path, f'popsize = 6\nupdating = "{updating}"'))
    assert spec.sampler_options["de"] == {"popsize": 6, "updating": updating}
    assert make_sampler("de", 0, spec.sampler_options["de"]).updating == updating


def test_updating_defaults_to_deferred(tmp_path):
    spec = load_study(_study_file(tmp_path, "popsize = 6"))
    assert make_sampler("de", 0, spec.sampler_options["de"]).updating == "deferred"


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('updating = "sometimes"', ["updating", "sometimes", "'deferred'", "'immediate'"]),
        ("updating = 1", ["updating", "str"]),
    ],
)
def test_bad_updating_in_study_file_is_a_clear_error(tmp_path, line, words):
    path = _study_file(tmp_path, line)
    with pytest.raises(TopoCAMError) as exc:
        load_study(path)
    msg = str(exc.value)
    for w in [str(path), "sampler.de", *words]:
        assert w in msg, f"{w!r} not in {msg!r}"
