"""Unit tests of topocam.search.samplers: names, options and per-trial seeding."""

import optuna
import pytest

from topocam.core.choices import check_n_trials
from topocam.core.errors import TopoCAMError
from topocam.search.samplers import (
    OPTIONS_SECTION, SAMPLER_TABLE, SAMPLERS, PerTrialSeeded, SamplerChoice, SamplerKind, check_samplers, make_sampler,
    trial_seed,
)


def _proposals(sampler, n=6):
    study = optuna.create_study(direction="maximize", sampler=sampler)
    out = []
    for _ in range(n):
        t = study.ask()
        x = t.suggest_float("x", -5, 5)
        c = t.suggest_categorical("c", ["a", "b", "c"])
        out.append((x, c))
        study.tell(t, -(x * x))
    return out


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_declared_name_builds_a_sampler_that_reproduces_from_its_seed(name):
    if name == "gp":
        pytest.importorskip("scipy")
    a, b, c = make_sampler(name, 3), make_sampler(name, 3), make_sampler(name, 4)
    assert isinstance(a, optuna.samplers.BaseSampler)
    pa, pb, pc = _proposals(a), _proposals(b), _proposals(c)
    assert pa == pb and pa != pc


def test_unknown_names_and_options_are_refused_with_the_choices():
    with pytest.raises(TopoCAMError, match=r"unknown sampler\(s\) \['annealing'\]; choose from de, de_immediate, tpe"):
        make_sampler("annealing", 0)
    with pytest.raises(TopoCAMError, match=r"\[study\] samplers: unknown sampler\(s\) \['x'\]"):
        check_samplers(["tpe", "x"], "[study] samplers")
    with pytest.raises(TopoCAMError, match=r"unknown sampler\(s\) \[\]"):
        check_samplers([])
    assert check_samplers("tpe") == ("tpe",)
    with pytest.raises(TopoCAMError, match=r"sampler 'tpe' takes no options \(got \['popsize'\]\)"):
        make_sampler("tpe", 0, {"popsize": 8})
    with pytest.raises(TopoCAMError, match=r"\[sampler.de\]"):
        make_sampler("de", 0, {"popsize": 1})


def test_de_immediate_is_de_with_immediate_updating():
    from topocam.search.de import DifferentialEvolutionSampler

    s = make_sampler("de_immediate", 0, {"popsize": 6})
    assert isinstance(s, DifferentialEvolutionSampler) and isinstance(make_sampler("de", 0), DifferentialEvolutionSampler)
    assert _proposals(make_sampler("de_immediate", 0, {"popsize": 6}), 12) != _proposals(make_sampler("de", 0, {"popsize": 6}), 12)


def test_per_trial_seeding_resumes_like_an_uninterrupted_run():
    """A new sampler object (a resumed process) proposes what the first one would have."""
    whole = _proposals(make_sampler("random", 7), 6)
    study = optuna.create_study(direction="maximize", sampler=make_sampler("random", 7))
    first = []
    for _ in range(3):
        t = study.ask()
        first.append((t.suggest_float("x", -5, 5), t.suggest_categorical("c", ["a", "b", "c"])))
        study.tell(t, 0.0)
    study.sampler = make_sampler("random", 7)  # "restart"
    rest = []
    for _ in range(3):
        t = study.ask()
        rest.append((t.suggest_float("x", -5, 5), t.suggest_categorical("c", ["a", "b", "c"])))
        study.tell(t, 0.0)
    assert first + rest == whole
    assert isinstance(make_sampler("tpe", 0), PerTrialSeeded)
    assert trial_seed(7, 0) != trial_seed(7, 1) != trial_seed(8, 1) and trial_seed(7, 1) == trial_seed(7, 1)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_budget_check(bad):
    with pytest.raises(TopoCAMError, match=r"--n-trials \(the trial budget\) must be an integer >= 1"):
        check_n_trials(bad, "--n-trials")
    assert check_n_trials(5) == 5


def test_sampler_names_are_the_table_keys():
    assert SAMPLERS == tuple(SAMPLER_TABLE) == ("de", "de_immediate", "tpe", "cmaes", "random", "gp")
    assert [c.value for c in SamplerChoice] == list(SAMPLER_TABLE)
    assert OPTIONS_SECTION == {"de": "de", "de_immediate": "de"}


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # QMCSampler, a toy row here
def test_a_new_row_is_a_new_sampler(monkeypatch):
    """Adding a sampler touches only the table: the name is then checked, built,
    refused options (it declares no [sampler.X] table) and seeded per trial."""
    monkeypatch.setitem(SAMPLER_TABLE, "qmc", SamplerKind(
        lambda seed, options: PerTrialSeeded(lambda s: optuna.samplers.QMCSampler(seed=s, warn_independent_sampling=False), seed)))
    assert check_samplers(["qmc", "tpe"]) == ("qmc", "tpe")
    a, b = make_sampler("qmc", 5), make_sampler("qmc", 5)
    assert isinstance(a, PerTrialSeeded) and _proposals(a) == _proposals(b)
    with pytest.raises(TopoCAMError, match=r"sampler 'qmc' takes no options \(got \['x'\]\); only \[sampler.de\] is configurable"):
        make_sampler("qmc", 0, {"x": 1})
    with pytest.raises(TopoCAMError, match=r"choose from de, de_immediate, tpe, cmaes, random, gp, qmc"):
        check_samplers("sobol")
