"""The study platform end to end, with real components: SQLite Optuna storages, a real
MLflow SQLite tracking store, the real pipeline on tiny synthetic data.

One backbone/CAM cache (TOPOCAM_CACHE_DIR) and one MLflow store serve the whole
module; studies are told apart by name. Torch runs single-threaded: the trials
fit tiny MLPs, for which threads only cost time on a busy 2-core machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from topocam.core.errors import TopoCAMError
from topocam.search import runner as runner_mod
from topocam.search.compare import compare
from topocam.search.runner import StudyRunner
from topocam.search.samplers import make_sampler
from topocam.search.status import study_status
from topocam.search.storage import open_storage
from topocam.search.studyfile import load_study
from topocam.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
S = optuna.trial.TrialState

# A tiny study: synthetic 2D images of 16 px, 2 backbone epochs, 8 Betti bins.
BASE: dict = {
    "study": {"name": "tiny", "n_trials": 4, "samplers": ["random", "tpe", "de"], "seeds": [0, 1]},
    "data": {"dataset": "synthetic2d", "size": 16, "synthetic_n": [40, 16, 16]},
    "backbone": {"backbone": "small", "epochs": 2, "batch_size": 16, "seed": 0},
    "fixed": {"bins": 8, "n_jobs": 1},
    "space": {
        "cam": {"choices": ["gradcam", "gradcampp"]},
        "mlp_h1": {"low": 4, "high": 16},
        "mlp_h2": {"low": 4, "high": 8},
    },
    "sampler": {"de": {"popsize": 4}},
}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def toml_text(doc: dict) -> str:
    """Tables of scalars, one level of nesting ([space.tau]) at most."""
    lines: list[str] = []
    for section, table in doc.items():
        if not isinstance(table, dict):
            lines.insert(0, f"{section} = {_toml_value(table)}")
            continue
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
        for sub, t in table.items():
            if isinstance(t, dict):
                lines.append(f"[{section}.{sub}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in t.items()]
    return "\n".join(lines) + "\n"


def study_doc(name: str, **changes) -> dict:
    """BASE with ``section={key: value}`` merged in (a value of None deletes the key)."""
    doc = json.loads(json.dumps(BASE))
    doc["study"]["name"] = name
    for section, table in changes.items():
        target = doc.setdefault(section, {})
        for k, v in table.items():
            if v is None:
                target.pop(k, None)
            else:
                target[k] = v
    return doc


def write_study(folder: Path, name: str, **changes) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(toml_text(study_doc(name, **changes)))
    return path


def make_runner(path: Path, storage: str, tracker: Tracker | None) -> StudyRunner:
    return StudyRunner(load_study(path), storage, tracker, progress=False, runs_dir=path.parent, log=lambda m: None)


def sqlite(folder: Path) -> str:
    return f"sqlite:///{folder / 'optuna.db'}"


_STORAGES: dict[str, optuna.storages.RDBStorage] = {}


def _storage(url: str) -> optuna.storages.RDBStorage:
    """One storage object per URL: opening one costs a schema check."""
    if url not in _STORAGES:
        _STORAGES[url] = optuna.storages.RDBStorage(url)
    return _STORAGES[url]


def trials_of(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    st = optuna.load_study(study_name=name, storage=_storage(storage))
    return sorted(st.get_trials(deepcopy=False), key=lambda t: t.number)


def mlflow_runs(tracker: Tracker, study: str, **tags) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracker.uri)  # a client of the test's own, on the tracker's store
    exp = client.get_experiment_by_name(study)
    assert exp is not None, f"no MLflow experiment {study!r}"
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()) or None
    return list(client.search_runs([exp.experiment_id], filter_string=flt, max_results=1000))


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Shared backbone/CAM cache, one MLflow store, single-threaded torch."""
    import torch

    cache = tmp_path_factory.mktemp("study-cache")
    runs = tmp_path_factory.mktemp("study-runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setenv("TOPOCAM_CACHE_DIR", str(cache))
    mp.setenv("TOPOCAM_OFFLINE", "1")
    try:
        tracker = Tracker(None, runs_dir=runs / "mlruns")
        yield SimpleNamespace(cache=cache, runs=runs / "mlruns", tracker=tracker)
    finally:
        mp.undo()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def warm(env, tmp_path_factory):
    """The backbone trained and both CAM variants cached, before any worker process needs them."""
    from topocam.core.pipeline import prepare

    path = write_study(tmp_path_factory.mktemp("warm"), "warm")
    ctx = prepare(load_study(path).base, progress=False)
    for v in ("gradcam", "gradcampp"):
        ctx.cams(v, "train")
    return ctx


@pytest.fixture(scope="module")
def resumed(env, warm, tmp_path_factory):
    """random/seed 0 run for 3 trials, resumed to 5 by a new runner, then run again at 5."""
    folder = tmp_path_factory.mktemp("resume")
    path = write_study(folder, "resume")
    storage = sqlite(folder)
    snap = lambda: [(t.number, t.state, dict(t.params), t.value) for t in trials_of(storage, "resume.random.s0")]  # noqa: E731
    r1 = make_runner(path, storage, env.tracker)
    r1.log_baselines()
    first = r1.run("random", 0, 3)
    after3 = snap()
    r2 = make_runner(path, storage, env.tracker)  # what a new process does
    r2.log_baselines()
    second = r2.run("random", 0, 5)
    after5 = snap()
    again = make_runner(path, storage, env.tracker).run("random", 0, 5)
    return SimpleNamespace(path=path, storage=storage, first=first, second=second, again=again,
                           after3=after3, after5=after5, after_again=snap())


# ------------------------------------------------------ 1. study-file parsing


def test_shipped_study_files_mean_what_they_say():
    """Every key a shipped file sets reaches the spec, the config and the space as
    written (read back here with tomllib, independently of load_study)."""
    import tomllib

    files = sorted((REPO / "studies").glob("*.toml"))
    assert files, "no study files shipped"
    for f in files:
        doc = tomllib.loads(f.read_text())
        spec = load_study(f)
        st = doc["study"]
        assert spec.name == st["name"] and spec.text == f.read_text()
        assert spec.n_trials == st.get("n_trials", 50) and list(spec.samplers) == st.get("samplers", list(spec.samplers))
        assert list(spec.seeds) == st.get("seeds", list(spec.seeds)) and spec.objective == st.get("objective", "val_auc")
        data, bb = doc.get("data", {}), doc.get("backbone", {})
        assert spec.base.dataset == data.get("dataset", spec.base.dataset)
        assert spec.base.size == data.get("size", 28) and spec.base.data_seed == data.get("data_seed", 0)
        assert list(spec.base.synthetic_n) == data.get("synthetic_n", [120, 40, 40])
        for key, value in bb.items():  # a study file's keys are the settings' names
            if key != "preset":
                assert getattr(spec.base, key) == (tuple(value) if isinstance(value, list) else value), (f, key)
        for key, value in doc.get("fixed", {}).items():
            assert getattr(spec.base, key) == value, (f, key)
        for name, table in doc.get("space", {}).items():
            p = spec.space[name]
            if "fixed" in table:
                assert p.kind == "fixed" and p.value == table["fixed"], (f, name)
            for bound in ("low", "high", "log"):
                if bound in table:
                    assert getattr(p, bound) == table[bound], (f, name, bound)
            if "choices" in table:
                assert list(p.choices) == table["choices"], (f, name)
        assert spec.sampler_options.get("de", {}) == {
            k: tuple(v) if isinstance(v, list) else v for k, v in doc.get("sampler", {}).get("de", {}).items()
        }


SHIPPED = sorted(f.stem for f in (REPO / "studies").glob("*.toml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_studies_let_de_evolve_five_generations(name):
    """A DE population that fills the budget compares Latin-hypercube sampling, not DE:
    the shipped budgets hold at least 5 generations of the population the sampler builds."""
    spec = load_study(REPO / "studies" / f"{name}.toml")
    sampler = make_sampler("de", 0, spec.sampler_options.get("de"))
    n_dims = sum(p.kind != "fixed" for p in spec.space.values())
    popsize = sampler.population_size(n_dims)
    assert spec.n_trials >= 5 * popsize, (spec.n_trials, popsize)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_studies_are_valid_and_name_their_data_file(name):
    """Every shipped study parses and validates, names a MedMNIST file the medmnist package
    publishes (URL and MD5 at that size) in its header, which says how to run it; a 3D study
    keeps Score-CAM out of its CPU search. Nothing is downloaded."""
    from medmnist import INFO

    from topocam.core.data import SYNTHETIC, check_dataset, medmnist_file

    path = REPO / "studies" / f"{name}.toml"
    spec = load_study(path)  # parses and validates every setting and the space
    base = spec.base
    check_dataset(base.dataset, base.size)
    if base.dataset in SYNTHETIC:  # the quickstart: its command is the README's first line
        return
    assert f"topocam study compare studies/{name}.toml" in spec.text
    sfx = "" if base.size == 28 else f"_{base.size}"
    info = INFO[base.dataset]
    assert info.get(f"url{sfx}") and info.get(f"MD5{sfx}"), (name, base.dataset, base.size)
    assert medmnist_file(base.dataset, base.size) in spec.text, f"{path.name} does not name its data file"
    if base.dataset.endswith("3d"):
        assert "scorecam" not in spec.space["cam"].choices, f"{path.name}: Score-CAM in a 3D CPU search"


BAD_FILES = [
    # (changes to the tiny study, words the message must contain)
    ({"extra": {"x": 1}}, ["extra"]),
    ({"study": {"colour": "red"}}, ["colour", "[study]"]),
    ({"study": {"n_trials": "ten"}}, ["n_trials", "int"]),
    ({"study": {"n_trials": True}}, ["n_trials"]),
    ({"data": {"size": 16.5}}, ["size", "[data]"]),
    ({"space": {"tau": {"low": 0.8, "high": 0.5}}}, ["space.tau", "empty range"]),
    ({"space": {"tau": {"low": 0.5, "high": 0.5}}}, ["space.tau", "empty range"]),
    ({"study": {"samplers": ["annealing"]}}, ["annealing", "samplers"]),
    ({"study": {"samplers": []}}, ["samplers"]),
    ({"space": {"dropout": {"low": 0.1, "high": 0.5}}}, ["space.dropout", "unknown search parameter"]),
    ({"space": {"cam": {"choices": ["gradcam", "xgradcam"]}}}, ["space.cam", "xgradcam"]),
    ({"space": {"cam": {"choices": []}}}, ["space.cam", "choices"]),
    ({"space": {"tau": {"low": 0.0, "high": 0.5, "log": True}}}, ["space.tau", "log"]),
    ({"space": {"w_layer2": {"low": 0.0, "high": 0.5, "log": True}}}, ["space.w_layer2", "log"]),
    ({"space": {"tau": {"low": 0.1, "high": 0.5, "log": "yes"}}}, ["space.tau", "log"]),
    ({"space": {"mlp_h1": {"low": 4.5, "high": 16}}}, ["space.mlp_h1", "low", "integer"]),
    ({"space": {"tau": {"high": 1.5}}}, ["space.tau", "high"]),
    ({"space": {"tau": {"lo": 0.1}}}, ["space.tau", "lo"]),
    ({"study": {"seeds": [-1]}}, ["seeds"]),
    ({"study": {"seeds": []}}, ["seeds"]),
    ({"study": {"seeds": ["a"]}}, ["seeds"]),
    ({"study": {"seeds": 3}}, ["seeds"]),
    ({"space": {"tau": {"fixed": 0.5, "low": 0.1}}}, ["space.tau", "fixed"]),
    ({"space": {"tau": {"fixed": 1.5}}}, ["space.tau", "fixed"]),
    ({"space": {"cam": {"fixed": "xgradcam"}}}, ["space.cam", "xgradcam"]),
    ({"space": {"w_layer2": {"fixed": 0.0}, "w_layer3": {"fixed": 0.0}, "w_layer4": {"fixed": 0.0}}}, ["fusion weights"]),
    ({"sampler": {"de": {"popsize": 2}}}, ["popsize"]),
    ({"sampler": {"de": {"temperature": 2}}}, ["temperature", "sampler.de"]),
    ({"sampler": {"tpe": {"n_startup_trials": 2}}}, ["sampler.tpe"]),
    ({"study": {"name": "my study"}}, ["name"]),
    ({"study": {"objective": "test_auc"}}, ["objective", "test_auc"]),
    ({"backbone": {"backbone": "vgg"}}, ["[backbone] backbone", "vgg", "small"]),
    ({"backbone": {"arch": "small", "backbone": "small"}}, ["both arch", "keep backbone"]),
    ({"fixed": {"tau_mode": "percent"}}, ["[fixed] tau_mode", "absolute, relative", "percent"]),
    ({"fixed": {"weights": [1.0, 2.0]}}, ["[fixed] weights", "3 values"]),
    ({"fixed": {"outside": "inside"}}, ["outside"]),
    ({"data": {"synthetic_n": [40, 16]}}, ["synthetic_n"]),
    ({"study": {"n_trials": 0}}, ["[study] n_trials", "must be an integer >= 1, got 0"]),
    ({"data": {"size": 2000}}, ["size 2000 is out of range", "12 <= size <= 1024"]),
    ({"data": {"dataset": "breastmnist", "size": 100}}, ["size 100 is not a MedMNIST size"]),
    ({"fixed": {"n_jobs": 0}}, ["n_jobs must be -1 (all cores) or a number of threads >= 1, got 0"]),
]


@pytest.mark.parametrize("changes, words", BAD_FILES, ids=[str(i) for i in range(len(BAD_FILES))])
def test_bad_study_file_names_key_and_file(tmp_path, changes, words):
    path = tmp_path / "bad.toml"
    doc = study_doc("bad")
    for section, table in changes.items():
        if section == "space":
            doc["space"].update(table)
        else:
            doc.setdefault(section, {}).update(table)
    path.write_text(toml_text(doc))
    with pytest.raises(TopoCAMError) as exc:
        load_study(path)
    msg = str(exc.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_old_study_file_keys_are_read_as_the_settings_they_became(tmp_path):
    """Files written before the keys took the settings' names ([data] seed, [backbone] arch and
    milestones) load as the same configuration, with one deprecation notice per old key; an
    old key's bad value is reported under the name the file uses."""
    from topocam.core.errors import DeprecatedKeyWarning

    def write(name, data, backbone):
        doc = study_doc(name)
        doc["data"] = {**doc["data"], **data}
        doc["backbone"] = {k: v for k, v in doc["backbone"].items() if k != "backbone"} | backbone
        path = tmp_path / f"{name}.toml"
        path.write_text(toml_text(doc))
        return path

    new = write("new", {"data_seed": 3}, {"backbone": "small", "lr_milestones": [1]})
    old = write("old", {"seed": 3}, {"arch": "small", "milestones": [1]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec_new = load_study(new)
    assert not [w for w in caught if issubclass(w.category, DeprecatedKeyWarning)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec_old = load_study(old)
    notices = sorted(str(w.message) for w in caught if issubclass(w.category, DeprecatedKeyWarning))
    assert len(notices) == 3 and all(str(old) in n for n in notices)
    assert any("[backbone] arch is now called backbone" in n for n in notices)
    assert any("[data] seed is now called data_seed" in n for n in notices)
    assert spec_old.base == spec_new.base and spec_old.base.data_seed == 3 and spec_old.base.lr_milestones == (1,)
    from topocam.search.fingerprint import definition

    assert definition(spec_old) == definition(spec_new)  # a stored study resumes under either spelling
    bad = write("bad", {}, {"arch": "vgg"})
    with pytest.raises(TopoCAMError, match=r"\[backbone\] arch must be one of auto, resnet18, r3d18, small; got 'vgg'"):
        load_study(bad)


def test_a_fixed_value_that_trials_still_search_is_said_with_the_table_that_fixes_it(tmp_path):
    """``[fixed] cam = "gradcam"`` with cam in the space: trials still search cam (the value sets the base
    only), which once cost a study 90 minutes of Score-CAM; the notice names the [space.cam] table. A fixed
    value the space does not search, or one fixed in [space.X], gives no notice."""
    from topocam.core.errors import StudyFileWarning

    def notices(path):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            spec = load_study(path)
        return spec, [str(w.message) for w in caught if issubclass(w.category, StudyFileWarning)]

    spec, said = notices(write_study(tmp_path, "trap", fixed={"cam": "gradcam", "weights": [1.0, 0.0, 0.0]},
                                     space={"cam": None}))  # cam searched by the default space only
    assert spec.base.cam == "gradcam" and spec.space["cam"].kind == "categorical"  # what the notice describes
    assert len(said) == 2, said
    cam = next(n for n in said if "[fixed] cam" in n)
    assert "trials still search cam" in cam and '[space.cam] fixed = ...' in cam and "trap.toml" in cam
    weights = next(n for n in said if "[fixed] weights" in n)
    assert all(f"[space.w_{layer}] fixed = ..." in weights for layer in ("layer2", "layer3", "layer4"))
    _, quiet = notices(write_study(tmp_path, "fine", fixed={"bins": 8, "n_jobs": 1, "cam": "gradcam"},
                                   space={"cam": {"fixed": "gradcam"}}))
    assert quiet == []
    # searched in a [space.cam] table of the file's own: knowingly (a base value for the baselines, choices for trials)
    _, knowing = notices(write_study(tmp_path, "knowing", fixed={"cam": "gradcam"}))  # BASE has [space.cam] choices
    assert knowing == []
    for shipped in sorted((REPO / "studies").glob("*.toml")):  # ours say nothing
        assert notices(shipped)[1] == [], shipped


def test_unreadable_study_files(tmp_path):
    with pytest.raises(TopoCAMError, match="does not exist"):
        load_study(tmp_path / "missing.toml")
    bad = tmp_path / "broken.toml"
    bad.write_text("[study\nname = 1\n")
    with pytest.raises(TopoCAMError, match="not valid TOML") as exc:
        load_study(bad)
    assert str(bad) in str(exc.value)
    top = tmp_path / "top.toml"
    top.write_text('sampler = 3\n[study]\nname = "top"\n')
    with pytest.raises(TopoCAMError, match=r"\[sampler\]"):
        load_study(top)


def test_narrowed_fixed_and_extended_space_are_what_trials_use(env, warm, tmp_path, monkeypatch):
    space = {
        "tau": {"fixed": 0.55},  # fixed: applied, never suggested
        "outside": {"fixed": "exclude"},  # an optional parameter, fixed
        "w_layer2": {"low": 0.1, "high": 0.2},  # narrowed
        "mlp_lr": {"low": 1e-3, "high": 2e-3, "log": True},  # added to the space
    }
    path = write_study(tmp_path, "narrow", space=space)
    spec = load_study(path)
    assert spec.space["tau"].kind == "fixed" and spec.space["w_layer2"].high == 0.2 and "mlp_lr" in spec.space
    seen = []
    real = runner_mod.evaluate
    monkeypatch.setattr(runner_mod, "evaluate", lambda ctx, cfg, report_test=False, **kw: seen.append(cfg) or real(ctx, cfg, report_test, **kw))
    storage = sqlite(tmp_path)
    result = make_runner(path, storage, env.tracker).run("random", 0, 4)
    trials = trials_of(storage, "narrow.random.s0")
    assert len(trials) == 4 and all(t.state == S.COMPLETE for t in trials)
    for t in trials:
        assert "tau" not in t.params and "outside" not in t.params
        assert 0.1 <= t.params["w_layer2"] <= 0.2
        assert 1e-3 <= t.params["mlp_lr"] <= 2e-3
        assert t.params["cam"] in ("gradcam", "gradcampp")
        assert 4 <= t.params["mlp_h1"] <= 16 and 4 <= t.params["mlp_h2"] <= 8
    assert len(seen) == 5  # 4 trials + the best one's test evaluation
    for cfg in seen:
        assert cfg.tau == 0.55 and cfg.outside == "exclude" and cfg.bins == 8 and 1e-3 <= cfg.mlp_lr <= 2e-3
    best = mlflow_runs(env.tracker, "narrow", kind="best")
    assert len(best) == 1
    p = best[0].data.params
    assert p["tau"] == "0.55" and p["outside"] == "exclude"
    assert float(p["w_layer2"]) == pytest.approx(result.best_params["w_layer2"])
    for run in mlflow_runs(env.tracker, "narrow", kind="trial"):
        assert run.data.params["tau"] == "0.55" and run.data.params["outside"] == "exclude"


def test_every_cam_variant_is_built_before_the_first_trial(env, tmp_path, monkeypatch):
    """A comparison's wall times measure trials: no sampler pays for CAMs another would reuse."""
    monkeypatch.setenv("TOPOCAM_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached yet
    path = write_study(tmp_path, "warmup", space={"cam": {"choices": ["gradcam", "gradcampp"]}})
    runner = make_runner(path, sqlite(tmp_path), None)
    assert runner.cam_variants() == ("gradcam", "gradcampp")
    runner.run("random", 0, 1)  # one trial can use only one variant
    assert all(runner.ctx.store.has(v) for v in ("gradcam", "gradcampp"))
    assert not runner.ctx.store.has("scorecam")
    fixed = make_runner(write_study(tmp_path, "warmfixed", space={"cam": {"fixed": "gradcampp"}}), sqlite(tmp_path), None)
    assert fixed.cam_variants() == ("gradcampp",)


def test_changed_definition_is_not_resumed(env, warm, tmp_path):
    storage = sqlite(tmp_path)
    path = write_study(tmp_path, "edited")
    make_runner(path, storage, None).run("random", 0, 1)
    write_study(tmp_path, "edited", fixed={"bins": 9}, space={"tau": {"low": 0.4, "high": 0.6}})
    t0 = time.perf_counter()
    with pytest.raises(TopoCAMError) as exc:
        make_runner(path, storage, None).run("random", 0, 2)
    msg = str(exc.value)
    assert "base.bins: 8 -> 9" in msg and "space.tau" in msg and str(path) in msg
    assert time.perf_counter() - t0 < 15  # before any training
    assert len(trials_of(storage, "edited.random.s0")) == 1
    # a budget or a description may change: that is the same study
    write_study(tmp_path, "edited", study={"n_trials": 7, "description": "longer"})
    assert len(make_runner(path, storage, None).run("random", 0, 2).values) == 2


# ------------------------------------------------------------------ 2. resume


def test_resume_adds_exactly_the_missing_trials(resumed):
    a3, a5 = resumed.after3, resumed.after5
    assert [n for n, *_ in a3] == [0, 1, 2]
    assert [n for n, *_ in a5] == [0, 1, 2, 3, 4]
    assert all(st == S.COMPLETE for _, st, _, _ in a5)
    assert a5[:3] == a3, "the first trials changed on resume"
    assert resumed.after_again == a5, "a run at the same budget added or changed trials"
    assert len(resumed.first.values) == 3 and len(resumed.second.values) == 5 and len(resumed.again.values) == 5
    # a resumed sampler does not replay the proposals of its first trials
    params = [p for _, _, p, _ in a5]
    for i in range(5):
        for j in range(i):
            assert params[i] != params[j], f"trial {i} repeats trial {j}"


def test_resumed_run_reproduces_an_uninterrupted_one(resumed, env, tmp_path):
    folder = tmp_path
    path = write_study(folder, "resume")  # same definition, another storage
    storage = sqlite(folder)
    make_runner(path, storage, None).run("random", 0, 5)
    straight = [(t.number, dict(t.params), t.value) for t in trials_of(storage, "resume.random.s0")]
    assert straight == [(n, p, v) for n, _, p, v in resumed.after5]


def test_resume_does_not_duplicate_mlflow_runs(resumed, env):
    trials = mlflow_runs(env.tracker, "resume", kind="trial", sampler="random", seed="0")
    assert sorted(int(r.data.tags["trial"]) for r in trials) == [0, 1, 2, 3, 4]
    parents = mlflow_runs(env.tracker, "resume", kind="sampler", sampler="random", seed="0")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["budget"] == "5"
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    assert len(mlflow_runs(env.tracker, "resume", kind="best")) == 1


# --------------------------------------------------------- 3. MLflow structure


def test_mlflow_run_structure(resumed, env):
    from mlflow import MlflowClient

    client, tr = MlflowClient(env.tracker.uri), env.tracker
    exps = [e for e in client.search_experiments() if e.name == "resume"]
    assert len(exps) == 1
    base = mlflow_runs(tr, "resume", kind="baseline")
    assert sorted(r.data.tags["baseline"] for r in base) == ["cnn", "topo_original"]  # once, after two runs
    for r in base:
        assert {"val_auc", "test_auc"} <= set(r.data.metrics) and r.info.status == "FINISHED"

    (parent,) = mlflow_runs(tr, "resume", kind="sampler")
    tags = parent.data.tags
    assert (tags["study"], tags["dataset"], tags["sampler"], tags["seed"], tags["kind"]) == ("resume", "synthetic2d", "random", "0", "sampler")
    assert parent.data.params["objective"] == "val_auc" and "search_space" in parent.data.params

    optuna_trials = {t.number: t for t in trials_of(resumed.storage, "resume.random.s0")}
    for r in mlflow_runs(tr, "resume", kind="trial"):
        t = optuna_trials[int(r.data.tags["trial"])]
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.metrics["val_auc"] == pytest.approx(t.value)
        assert "duration_s" in r.data.metrics and r.info.status == "FINISHED"
        assert set(t.params) <= set(r.data.params)
        assert not any(k.startswith("test_") for k in r.data.metrics), "a trial run holds test metrics"

    (best,) = mlflow_runs(tr, "resume", kind="best")
    best_trial = max(optuna_trials.values(), key=lambda t: (t.value, -t.number))
    assert best.data.tags["trial"] == str(best_trial.number) == str(resumed.second.best_trial)
    assert best.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "test_auc" in best.data.metrics and best.data.metrics["val_auc"] == pytest.approx(best_trial.value)
    assert resumed.second.test["auc"] == pytest.approx(best.data.metrics["test_auc"])
    assert parent.data.metrics["best_val_auc"] == pytest.approx(best_trial.value)

    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"study", "plots", "history"} <= top
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "study")] == ["study/resume.toml"]
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/parallel_coordinate.png"} <= plots
    assert any(p.startswith("plots/param_importances") for p in plots)


# ----------------------------------------------------------------- 4. failures


def _failing_on(calls: set[int], exc_type=RuntimeError):
    real = runner_mod.evaluate
    count = {"n": 0}

    def fake(ctx, cfg, report_test=False, **kw):
        if not report_test:
            count["n"] += 1
            if count["n"] in calls:
                raise exc_type(f"boom on purpose (call {count['n']})")
        return real(ctx, cfg, report_test, **kw)

    return fake


def test_failed_trial_is_recorded_and_the_study_goes_on(env, warm, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "evaluate", _failing_on({2}))
    storage = sqlite(tmp_path)
    result = make_runner(write_study(tmp_path, "failing"), storage, env.tracker).run("random", 0, 4)
    trials = trials_of(storage, "failing.random.s0")
    assert [t.state for t in trials] == [S.COMPLETE, S.FAIL, S.COMPLETE, S.COMPLETE]  # failures count toward the budget
    assert result.n_failed == 1 and math.isnan(result.values[1]) and len(result.values) == 4
    assert result.best_trial != 1
    runs = {int(r.data.tags["trial"]): r for r in mlflow_runs(env.tracker, "failing", kind="trial")}
    assert sorted(runs) == [0, 1, 2, 3]
    assert runs[1].info.status == "FAILED"
    assert "boom on purpose (call 2)" in runs[1].data.tags["error"] and "RuntimeError" in runs[1].data.tags["error"]
    assert all(runs[n].info.status == "FINISHED" and "error" not in runs[n].data.tags for n in (0, 2, 3))


def test_every_trial_failing(env, warm, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "evaluate", _failing_on({1, 2, 3}))
    storage = sqlite(tmp_path)
    runner = make_runner(write_study(tmp_path, "allfail"), storage, env.tracker)
    runner.progress = True  # the progress bar copes with no best value
    result = runner.run("tpe", 0, 3)
    assert [t.state for t in trials_of(storage, "allfail.tpe.s0")] == [S.FAIL] * 3
    assert result.n_failed == 3 and math.isnan(result.best_value) and result.test is None and result.best_trial == -1
    assert mlflow_runs(env.tracker, "allfail", kind="best") == []
    (parent,) = mlflow_runs(env.tracker, "allfail", kind="sampler")
    assert parent.info.status == "FINISHED"
    plots = {a.path for a in env.tracker.list_artifacts(parent.info.run_id, "plots")}
    assert plots, "the plots (or notes saying why they are missing) were not logged"
    rows = study_status("allfail", storage)
    assert rows[0]["failed"] == 3 and rows[0]["best_trial"] == -1 and math.isnan(rows[0]["best_value"])


def test_interrupted_run_is_marked_and_resumes(env, warm, tmp_path, monkeypatch):
    storage = sqlite(tmp_path)
    path = write_study(tmp_path, "interrupted")
    monkeypatch.setattr(runner_mod, "evaluate", _failing_on({2}, KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        make_runner(path, storage, env.tracker).run("random", 0, 4)
    (parent,) = mlflow_runs(env.tracker, "interrupted", kind="sampler")
    assert parent.info.status == "KILLED"
    runs = {int(r.data.tags["trial"]): r for r in mlflow_runs(env.tracker, "interrupted", kind="trial")}
    assert runs[1].info.status == "KILLED" and "KeyboardInterrupt" in runs[1].data.tags["error"]
    stopped = trials_of(storage, "interrupted.random.s0")
    assert [t.state for t in stopped] == [S.COMPLETE, S.FAIL, S.WAITING]  # the stopped trial is re-queued
    assert "KeyboardInterrupt" in stopped[1].user_attrs["stopped"] and "error" not in stopped[1].user_attrs
    assert stopped[2].params == stopped[1].params and stopped[2].system_attrs["failed_trial"] == 1
    monkeypatch.undo()
    result = make_runner(path, storage, env.tracker).run("random", 0, 4)
    # the interrupted trial does not count: 4 COMPLETE, its configuration among them
    trials = trials_of(storage, "interrupted.random.s0")
    assert [t.state for t in trials] == [S.COMPLETE, S.FAIL, S.COMPLETE, S.COMPLETE, S.COMPLETE]
    assert trials[2].params == trials[1].params
    assert result.n_failed == 0 and result.numbers == [0, 2, 3, 4]
    (parent,) = mlflow_runs(env.tracker, "interrupted", kind="sampler")
    assert parent.info.status == "FINISHED"


def test_killed_worker_trial_is_closed_in_mlflow(env, warm, tmp_path):
    storage, path = sqlite(tmp_path), write_study(tmp_path, "killed")
    make_runner(path, storage, env.tracker).run("random", 0, 1)
    # a worker dies mid-trial: its Optuna trial stays RUNNING, its MLflow run too
    st = optuna.load_study(study_name="killed.random.s0", storage=_storage(storage))
    orphan = st.ask()
    (parent,) = mlflow_runs(env.tracker, "killed", kind="sampler")
    tags = {"study": "killed", "dataset": "synthetic2d", "arm": "topocam", "kind": "trial", "sampler": "random", "seed": 0, "trial": orphan.number}
    rid = env.tracker.start_run(env.tracker.experiment("killed"), "orphan", tags, parent=parent.info.run_id)
    st.tell(orphan, state=S.FAIL)  # what Optuna's heartbeat check does after the grace period
    make_runner(path, storage, env.tracker).run("random", 0, 3)
    run = env.tracker.get_run(rid)
    assert run.info.status == "KILLED" and "stale heartbeat" in run.data.tags["error"]
    # the lost trial does not count toward the budget of 3
    assert [t.state for t in trials_of(storage, "killed.random.s0")] == [S.COMPLETE, S.FAIL, S.COMPLETE, S.COMPLETE]


def test_a_better_trial_supersedes_the_best_run(env, warm, tmp_path, monkeypatch):
    storage, path = sqlite(tmp_path), write_study(tmp_path, "supersede")
    make_runner(path, storage, env.tracker).run("random", 0, 2)
    (old,) = mlflow_runs(env.tracker, "supersede", kind="best")
    real = runner_mod.evaluate

    def boosted(ctx, cfg, report_test=False, **kw):
        out = real(ctx, cfg, report_test, **kw)
        if not report_test:
            out.val["auc"] = 2.0  # the next trial wins
        return out

    monkeypatch.setattr(runner_mod, "evaluate", boosted)
    assert make_runner(path, storage, env.tracker).run("random", 0, 3).best_trial == 2
    (new,) = mlflow_runs(env.tracker, "supersede", kind="best")
    assert new.data.tags["trial"] == "2"
    (sup,) = mlflow_runs(env.tracker, "supersede", kind="best_superseded")
    assert sup.info.run_id == old.info.run_id
    # summarised on the first 2 trials again: the earlier best is promoted back, nothing recomputed
    monkeypatch.setattr(runner_mod, "evaluate", lambda *a, **k: pytest.fail("recomputed a logged best"))
    assert make_runner(path, storage, env.tracker).run("random", 0, 2).best_trial == int(old.data.tags["trial"])
    (best,) = mlflow_runs(env.tracker, "supersede", kind="best")
    assert best.info.run_id == old.info.run_id
    assert len(mlflow_runs(env.tracker, "supersede", kind="best_superseded")) == 1


# ------------------------------------------------------ 5. test never chooses


def test_test_metrics_only_after_the_search(env, warm, tmp_path, monkeypatch):
    from topocam.core.pipeline import Context

    storage = sqlite(tmp_path)
    events: list[tuple] = []
    real = runner_mod.evaluate
    phase = {"in_eval": None}

    def spy(ctx, cfg, report_test=False, **kw):
        n_done = sum(len(trials_of(storage, f"choose.random.s{s}")) for s in (0, 1) if _exists(storage, f"choose.random.s{s}"))
        events.append(("evaluate", report_test, n_done, cfg))
        phase["in_eval"] = report_test
        try:
            return real(ctx, cfg, report_test, **kw)
        finally:
            phase["in_eval"] = None

    real_gray = Context.gray
    touched = []
    monkeypatch.setattr(runner_mod, "evaluate", spy)
    monkeypatch.setattr(Context, "gray", lambda self, split, *a: touched.append((split, phase["in_eval"])) or real_gray(self, split, *a))
    runner = make_runner(write_study(tmp_path, "choose"), storage, None)
    results = [runner.run("random", seed, 3) for seed in (0, 1)]

    flags = [e[1] for e in events]
    assert flags == [False, False, False, True, False, False, False, True]
    for i, r in zip((3, 7), results):
        _, _, n_done, cfg = events[i]
        assert n_done == (3 if i == 3 else 6), "test metrics were computed before the search ended"
        best = r.best_params
        assert cfg.tau == pytest.approx(best["tau"]) and cfg.cam == best["cam"] and cfg.mlp == (best["mlp_h1"], best["mlp_h2"])
    assert ("test", False) not in touched, "a trial touched the test images"
    assert ("test", True) in touched


def _exists(storage: str, name: str) -> bool:
    return name in optuna.get_all_study_names(_storage(storage))


# ------------------------------------------------------------------ 6. compare


def test_compare_equal_budgets_and_consistent_summary(env, warm, tmp_path):
    storage = sqlite(tmp_path)
    path = write_study(tmp_path, "cmp")
    runner = make_runner(path, storage, env.tracker)
    runner.run("random", 0, 5)  # an earlier, longer run: the comparison must still use 4 trials
    out = tmp_path / "out"
    comp = compare(runner, ["random", "tpe"], [0, 1], n_trials=4, out_dir=out)
    for f in ("comparison.md", "comparison.csv", "comparison.json", "best_so_far.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    detail = json.loads((out / "comparison.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert [r["sampler"] for r in detail["rows"]] == ["random", "tpe"]

    for row in detail["rows"]:
        curves = []
        for seed in (0, 1):
            trials = [t for t in trials_of(storage, f"cmp.{row['sampler']}.s{seed}") if t.state in (S.COMPLETE, S.FAIL, S.PRUNED)]
            expected = 5 if (row["sampler"], seed) == ("random", 0) else 4
            assert len(trials) == expected, "unequal budget"
            vals = [t.value if t.state == S.COMPLETE else -np.inf for t in trials[:4]]
            curves.append(np.maximum.accumulate(vals))
        previous = None
        for pct, k in (("25%", 1), ("50%", 2), ("100%", 4)):
            cell = row[f"best_val_auc@{pct}"]
            at = [c[k - 1] for c in curves]
            assert cell["median"] == pytest.approx(float(np.median(at)))
            assert cell["min"] == pytest.approx(min(at)) and cell["max"] == pytest.approx(max(at))
            if previous is not None:
                assert all(cell[s] >= previous[s] - 1e-12 for s in ("median", "min", "max"))
            previous = cell
    # the longer run's extra trials are not in the comparison
    (rand0,) = [r for r in comp.runs if (r.sampler, r.seed) == ("random", 0)]
    assert len(rand0.values) == 4 and rand0.best_trial < 4 and rand0.numbers == [0, 1, 2, 3]
    for r in detail["runs"]:
        assert len(r["values"]) == 4

    best = mlflow_runs(env.tracker, "cmp", kind="best", sampler="random", seed="0", arm="topocam")
    assert len(best) == 1 and best[0].data.tags["trial"] == str(rand0.best_trial)
    (run,) = mlflow_runs(env.tracker, "cmp", kind="comparison")
    arts = {a.path for a in env.tracker.list_artifacts(run.info.run_id, "comparison")}
    assert arts == {f"comparison/{f}" for f in ("comparison.md", "comparison.csv", "comparison.json", "best_so_far.png")}
    assert run.data.metrics["random_best_val_auc_at100pct_median"] == pytest.approx(detail["rows"][0]["best_val_auc@100%"]["median"])
    assert "| random |" in (out / "comparison.md").read_text()


def test_compare_replicates_each_best_configuration_over_model_seeds(env, warm, tmp_path):
    """replicate_seeds: every (sampler, seed)'s best configuration is re-tested under each
    model seed (its own backbone, CAMs and MLP seed); the row reports mean ± sd over all."""
    from dataclasses import replace

    from topocam.core.pipeline import evaluate, prepare
    from topocam.search.space import apply_params

    path = write_study(tmp_path, "rep", study={"replicate_seeds": [0, 3]})
    runner = make_runner(path, sqlite(tmp_path), env.tracker)
    out = tmp_path / "out"
    comp = compare(runner, ["random"], [0, 1], n_trials=3, out_dir=out)
    rep = comp.replication
    assert rep["seeds"] == [0, 3] and set(rep["per_run"]) == {"random.s0", "random.s1"}
    values = [res["test"]["auc"] for reps in rep["per_run"].values() for res in reps.values()]
    cell = comp.rows[0]["test_auc_replicated"]
    assert cell["n"] == 4 and cell["mean"] == pytest.approx(np.mean(values)) and cell["sd"] == pytest.approx(np.std(values, ddof=1))
    # seed 3 is a different backbone, and its number is what that backbone gives the chosen configuration
    r0 = next(r for r in comp.runs if r.seed == 0)
    ctx3 = prepare(replace(runner.spec.base, seed=3), progress=False, data=runner.ctx.data)
    assert ctx3.backbone.cache_key != runner.ctx.backbone.cache_key
    direct = evaluate(ctx3, replace(apply_params(runner.spec.base, r0.best_params), seed=3), report_test=True)
    assert rep["per_run"]["random.s0"][3]["test"]["auc"] == pytest.approx(direct.test["auc"])
    assert set(rep["baselines"]) == {"cnn", "topo_original"} and rep["baselines"]["cnn"]["n"] == 2
    md = (out / "comparison.md").read_text()
    assert "test_auc_replicated" in md and "model seeds [0, 3]" in md
    detail = json.loads((out / "comparison.json").read_text())
    assert detail["replication"]["seeds"] == [0, 3]
    (parent,) = mlflow_runs(env.tracker, "rep", kind="sampler", sampler="random", seed="0", arm="topocam")
    assert parent.data.metrics["replicated_test_auc_mean"] == pytest.approx(
        np.mean([res["test"]["auc"] for res in rep["per_run"]["random.s0"].values()]))


def test_cv_objective_is_the_k_fold_training_estimate(env, warm, tmp_path):
    """objective = "cv_auc": each trial's value is the 5-fold AUC on the training split,
    not the validation AUC; the comparison names its columns after the objective."""
    storage = sqlite(tmp_path)
    path = write_study(tmp_path, "cv", study={"objective": "cv_auc"})
    runner = make_runner(path, storage, None)
    out = tmp_path / "out"
    comp = compare(runner, ["random"], [0], n_trials=2, out_dir=out)
    trials = [t for t in trials_of(storage, "cv.random.s0") if t.state == S.COMPLETE]
    assert trials and all(t.value == t.user_attrs["cv_auc"] for t in trials)
    assert any(t.value != t.user_attrs["val_auc"] for t in trials)
    assert "best_cv_auc@100%" in comp.rows[0] and "best_cv_auc@100%" in (out / "comparison.md").read_text()


def test_failures_are_grouped_by_error_with_the_parameters_they_share(env, warm, tmp_path, monkeypatch):
    """A CAM variant that always fails must be obvious, not a count in a column."""
    real = runner_mod.evaluate

    def broken_gradcampp(ctx, cfg, report_test=False, **kw):
        if cfg.cam == "gradcampp" and not report_test:
            raise RuntimeError("gradcampp exploded on purpose")
        return real(ctx, cfg, report_test, **kw)

    monkeypatch.setattr(runner_mod, "evaluate", broken_gradcampp)
    storage = sqlite(tmp_path)
    path = write_study(tmp_path, "fails")
    out = tmp_path / "out"
    comp = compare(make_runner(path, storage, None), ["random"], [0], n_trials=8, out_dir=out)
    trials = trials_of(storage, "fails.random.s0")
    bad = [t.number for t in trials if t.params["cam"] == "gradcampp"]
    assert len(bad) >= 2, "precondition: the sampler drew the broken variant at least twice"
    (group,) = comp.runs[0].failures
    assert group["count"] == len(bad) and group["trials"] == bad
    assert group["error"] == "RuntimeError: gradcampp exploded on purpose" and group["shared_params"] == {"cam": "gradcampp"}
    md = (out / "comparison.md").read_text()
    assert "Failed trials, grouped by error" in md and "'cam': 'gradcampp'" in md and f"| {len(bad)} |" in md


def test_sampler_statistics_mean_rank_and_paired_test():
    from topocam.search.compare import sampler_statistics
    from topocam.search.runner import SamplerRun

    rng = np.random.default_rng(0)
    base = rng.random((6, 4)).cumsum(axis=1)
    curves = {"good": base + 1.0, "random": base, "same": base.copy()}
    rows = [{"sampler": s} for s in curves]
    runs = [SamplerRun(s, i, [], [], 0.0, {}, 0, {"auc": float(c[i, -1])}, None, 0) for s, c in curves.items() for i in range(6)]
    text = sampler_statistics(rows, curves, runs, 4, "auc")
    good, rand, same = rows
    assert good["mean_rank"] == {"25%": 1.0, "50%": 1.0, "100%": 1.0}
    assert rand["mean_rank"]["100%"] == same["mean_rank"]["100%"] == 2.5  # tied everywhere: averaged ranks
    assert good["p_vs_random"] == pytest.approx(2 / 2**6)  # exact two-sided p of 6 positive differences
    assert same["p_vs_random"] == 1.0 and rand["p_vs_random"] is None
    assert "good (p = 0.031)" in text and "same" not in text.split("random search at alpha")[1]


def test_topo_original_is_tuned_on_the_same_budget_and_sampler(env, warm, tmp_path):
    """DESIGN.md §2.9: the whole-image baseline gets the same sampler, budget, seeds and MLP
    search as TopoCAM (its space has no weights, tau or CAM), and sits beside it in the table."""
    from topocam.core.pipeline import evaluate as pipeline_evaluate
    from topocam.core.pipeline import fit_and_score, original_features
    from topocam.search.space import apply_params

    storage = sqlite(tmp_path)
    path = write_study(tmp_path, "fair")
    runner = make_runner(path, storage, env.tracker)
    out = tmp_path / "out"
    compare(runner, ["random"], [0], n_trials=3, out_dir=out)
    mine, base = trials_of(storage, "fair.random.s0"), trials_of(storage, "fair-topo_original.random.s0")
    assert len(mine) == len(base) == 3
    assert set(base[0].params) == {"mlp_h1", "mlp_h2"} and {"cam", "w_layer2", "tau"} <= set(mine[0].params)
    # a Topo-Original trial's value is the whole-image pipeline with that MLP
    arm = runner.for_arm("topo_original")
    cfg = apply_params(arm.spec.base, base[1].params)
    assert cfg.method == "topo_original"
    direct = fit_and_score(runner.ctx, cfg, original_features(runner.ctx, cfg), report_test=False)
    assert base[1].value == pytest.approx(direct.val["auc"]) == pytest.approx(pipeline_evaluate(runner.ctx, cfg).val["auc"])
    detail = json.loads((out / "comparison.json").read_text())
    (row,) = detail["equal_budget"]["rows"]
    assert row["sampler"] == "random" and row["topo_original"]["n"] == 1 and row["topocam"]["n"] == 1
    assert "Topo-Original (tuned)" in (out / "comparison.md").read_text()
    assert {r.data.tags["arm"] for r in mlflow_runs(env.tracker, "fair", kind="trial")} == {"topocam", "topo_original"}


def test_study_file_data_seed_clutter_and_replicate_seeds(tmp_path):
    spec = load_study(write_study(tmp_path, "ds", data={"seed": 4, "clutter": 1}, study={"replicate_seeds": [1, 2, 1]}))
    assert spec.base.data_seed == 4 and spec.base.clutter == 1 and spec.replicate_seeds == (1, 2)
    with pytest.raises(TopoCAMError, match="replicate_seeds must be a list of non-negative integers"):
        load_study(write_study(tmp_path, "bad", study={"replicate_seeds": [-1]}))


# ------------------------------------------------------------------- 7. status


def test_status(resumed):
    rows = study_status("resume", resumed.storage)
    assert len(rows) == 1
    (row,) = rows
    best = max(trials_of(resumed.storage, "resume.random.s0"), key=lambda t: (t.value, -t.number))
    assert (row["sampler"], row["seed"], row["complete"], row["failed"], row["running"]) == ("random", 0, 5, 0, 0)
    assert row["best_value"] == pytest.approx(best.value) and row["best_trial"] == best.number
    with pytest.raises(TopoCAMError) as exc:
        study_status("nosuch", resumed.storage)
    assert "nosuch" in str(exc.value) and "resume" in str(exc.value)


def test_status_keeps_dotted_names_apart(tmp_path):
    storage = sqlite(tmp_path)
    for name, owner in (("a.random.s0", "a"), ("a.tpe.s1", "a"), ("a.b.random.s0", "a.b")):
        st = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        st.set_user_attr("topocam_study", owner)
        st.set_user_attr("sampler", name.split(".")[-2])
        st.set_user_attr("seed", int(name[-1]))
    st.enqueue_trial({})
    assert [(r["sampler"], r["seed"]) for r in study_status("a", storage)] == [("random", 0), ("tpe", 1)]
    (row,) = study_status("a.b", storage)
    assert row["waiting"] == 1 and row["complete"] == 0


# ------------------------------------------------------------ 8. fail fast


@pytest.mark.parametrize("url, words", [
    ("postgresql://u:p@127.0.0.1:1/db", ["cannot open Optuna storage", "--storage"]),
    ("sqlite:////nonexistent/dir/x.db", ["/nonexistent/dir", "does not exist"]),
    ("redis://x", ["unsupported storage URL"]),
])
def test_bad_storage_fails_fast(url, words):
    t0 = time.perf_counter()
    with pytest.raises(TopoCAMError) as exc:
        open_storage(url)
    assert time.perf_counter() - t0 < 15
    for w in words:
        assert w in str(exc.value)


@pytest.mark.parametrize("uri", ["http://127.0.0.1:1", "sqlite:////nonexistent/dir/mlflow.db"])
def test_bad_tracking_uri_fails_fast(uri):
    t0 = time.perf_counter()
    with pytest.raises(TopoCAMError, match="--tracking-uri"):
        Tracker(uri)
    assert time.perf_counter() - t0 < 15
    assert not Path("/nonexistent").exists()


# ------------------------------------------------------- 9. two workers, one study


def test_two_worker_processes_finish_exactly_the_budget(env, warm, tmp_path):
    exe = Path(sys.executable).with_name("topocam")
    if not exe.is_file():
        pytest.skip(f"{exe} absent (package not installed in this environment)")
    path = write_study(tmp_path, "workers")
    args = [str(exe), "study", "run", str(path), "--sampler", "de", "--seed", "0", "--n-trials", "6",
            "--runs-dir", str(env.runs), "--quiet"]
    child_env = {**os.environ, "TOPOCAM_CACHE_DIR": str(env.cache), "TOPOCAM_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, cwd=tmp_path, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("worker did not finish")
    diag = "\n".join(f"--- worker {i} (rc {p.returncode}):\n{out[-2500:]}" for i, (p, out) in enumerate(zip(procs, outs)))
    assert all(p.returncode == 0 for p in procs), diag
    storage = f"sqlite:///{env.runs / 'optuna.db'}"
    trials = trials_of(storage, "workers.de.s0")
    diag = f"trials: {[(t.number, t.state.name, t.user_attrs) for t in trials]}\n{diag}"
    assert [t.number for t in trials] == list(range(6)), diag
    assert all(t.state == S.COMPLETE for t in trials), diag
    vectors = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(vectors)) == 6, f"two trials proposed the same configuration\n{diag}"
    runs = mlflow_runs(env.tracker, "workers", kind="trial")
    assert sorted(int(r.data.tags["trial"]) for r in runs) == list(range(6)), diag
    for kind, n in (("sampler", 1), ("baseline", 2), ("best", 1)):
        found = mlflow_runs(env.tracker, "workers", kind=kind)
        assert len(found) == n, f"{len(found)} {kind} runs: {[(r.info.status, r.data.tags) for r in found]}\n{diag}"


# --------------------------------------------------------------------- 10. CLI


def test_cli_study_commands(env, warm, tmp_path):
    from typer.testing import CliRunner

    from topocam.cli import app

    cli = CliRunner()
    runs = str(env.runs)
    path = write_study(tmp_path, "clistudy")
    r = cli.invoke(app, ["study", "run", str(path), "--sampler", "random", "--seed", "0", "--n-trials", "3", "--runs-dir", runs, "--quiet"])
    assert r.exit_code == 0, r.output
    assert "3 trials (0 failed)" in r.output and "best val AUC" in r.output

    r = cli.invoke(app, ["study", "status", "clistudy", "--runs-dir", runs])
    assert r.exit_code == 0, r.output
    assert "clistudy.random.s0" in r.output

    out = tmp_path / "cmp"
    r = cli.invoke(app, ["study", "compare", str(path), "--samplers", "random,de", "--seeds", "1", "--n-trials", "3",
                         "--runs-dir", runs, "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / "comparison.json").is_file() and "| de |" in r.output
    assert "median [min, max] over seeds" in r.output  # printed as text, not eaten as console markup
    storage = f"sqlite:///{env.runs / 'optuna.db'}"
    assert len(trials_of(storage, "clistudy.de.s0")) == 3 and len(trials_of(storage, "clistudy.random.s0")) == 3


@pytest.mark.parametrize("args, words", [
    (["study", "run", "{missing}"], ["does not exist"]),
    (["study", "run", "{path}", "--storage", "redis://x"], ["unsupported storage URL"]),
    (["study", "run", "{path}", "--storage", "sqlite:////nonexistent/dir/x.db"], ["does not exist"]),
    (["study", "run", "{path}", "--tracking-uri", "http://127.0.0.1:1"], ["--tracking-uri"]),
    (["study", "status", "nosuchstudy"], ["nosuchstudy"]),
    (["study", "run", "{path}", "--seed", "-1"], ["sampler seed", ">= 0", "-1"]),
])
def test_cli_bad_input_is_one_line_and_nonzero(env, tmp_path, args, words):
    from typer.testing import CliRunner

    from topocam.cli import app

    path = write_study(tmp_path, "clibad")
    open_storage(sqlite(env.runs))  # the shared runs folder has a storage (for `status nosuchstudy`)
    args = [a.format(path=path, missing=tmp_path / "missing.toml") for a in args]
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, [*args, "--runs-dir", str(env.runs)])
    assert r.exit_code != 0
    assert time.perf_counter() - t0 < 15
    text = r.output.strip()
    assert "Traceback" not in text and text.startswith("error:") and len(text.splitlines()) == 1, text
    for w in words:
        assert w in text, text
