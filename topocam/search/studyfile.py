"""Study definitions (``studies/*.toml``): parsed strictly, errors name the key and the file.

    [study]     name, objective (val_auc | val_acc | cv_auc | cv_acc), n_trials, samplers, seeds, replicate_seeds,
                tune_topo_original (default true), description, grace_period (seconds, default 20)
    [data]      dataset, data_dir, size, synthetic_n, seed (synthetic data seed), clutter (synthetic difficulty)
    [backbone]  arch, epochs, batch_size, lr, seed, milestones, preset (medmnist_v2; explicit keys win)
    [fixed]     outside, bins, betti_backend, mlp_lr, mlp_weight_decay, n_jobs
    [space.P]   narrow (low/high/log or choices), fix (fixed = v) or add a parameter
    [sampler.de] popsize_per_dim, strategy, mutation, recombination, updating (deferred | immediate)

``[fixed]`` is the base configuration: what the baselines (CNN, Topo-Original)
use and what every trial uses unless a ``[space.X]`` table searches or fixes X.

The backbone seed is a property of the study, so every sampler and every
sampler seed optimises the same objective: the comparison measures the
optimisers, not the luck of the backbone.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import TopoCAMError
from ..core.pipeline import TopoCAMConfig
from ..core.choices import check_n_trials
from .samplers import check_samplers, make_sampler
from .space import Param, build_space

DEFAULT_GRACE_PERIOD = 20  # seconds; heartbeats every grace_period // 4
OBJECTIVES = ("val_auc", "val_acc", "cv_auc", "cv_acc")  # cv_*: 5-fold on the training split
_SECTIONS: dict[str, dict[str, type | tuple]] = {
    "study": {"name": str, "objective": str, "n_trials": int, "samplers": list, "seeds": list,
              "replicate_seeds": list, "tune_topo_original": bool, "description": str,
              "grace_period": int},
    "data": {"dataset": str, "data_dir": str, "size": int, "synthetic_n": list, "seed": int, "clutter": int},
    "backbone": {"arch": str, "epochs": int, "batch_size": int, "lr": (float, int), "seed": int, "preset": str,
                 "milestones": list},
    "fixed": {"outside": str, "bins": int, "betti_backend": str, "mlp_lr": (float, int),
              "mlp_weight_decay": (float, int), "n_jobs": int},
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")
_DE_KEYS = {"popsize_per_dim": int, "popsize": int, "strategy": str, "mutation": (float, int, list), "recombination": (float, int),
            "updating": str}  # values are checked by the sampler (make_sampler below)


@dataclass(frozen=True)
class StudySpec:
    name: str
    path: Path
    text: str  # the file as written, logged with every study
    base: TopoCAMConfig
    space: dict[str, Param]
    objective: str = "val_auc"
    n_trials: int = 50
    samplers: tuple[str, ...] = ("de", "tpe", "cmaes", "random")
    seeds: tuple[int, ...] = (0, 1, 2)
    description: str = ""
    # model seeds (backbone + MLP) over which each sampler's best configuration is
    # re-evaluated on test after the search: the reported number is mean ± sd over them
    replicate_seeds: tuple[int, ...] = ()
    # compare also searches Topo-Original (whole image) with the same sampler, budget and MLP space
    tune_topo_original: bool = True
    sampler_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # a running trial whose worker has not sent a heartbeat for this long is failed and re-queued
    # (its worker was killed); not part of the study's definition
    grace_period: int = DEFAULT_GRACE_PERIOD

    @property
    def metric(self) -> str:
        """The metric the objective is on (``auc``/``acc``): what test reports too."""
        return self.objective.split("_", 1)[1]

    @property
    def cv_folds(self) -> int:
        """Folds of the training split the objective is estimated on (0: validation)."""
        from ..core.pipeline import CV_FOLDS

        return CV_FOLDS if self.objective.startswith("cv_") else 0


def _typed(section: str, key: str, value: Any, want, where: str) -> Any:
    types = want if isinstance(want, tuple) else (want,)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise TopoCAMError(f"{where}: [{section}] {key} must be {names}, got {value!r}")
    return value


def _table(doc: dict, section: str, where: str) -> dict:
    t = doc.get(section, {})
    if not isinstance(t, dict):
        raise TopoCAMError(f"{where}: [{section}] must be a table")
    schema = _SECTIONS[section]
    unknown = sorted(set(t) - set(schema))
    if unknown:
        raise TopoCAMError(f"{where}: unknown key(s) {unknown} in [{section}]; allowed: {sorted(schema)}")
    return {k: _typed(section, k, v, schema[k], where) for k, v in t.items()}


def load_study(path: str | Path, data_dir: str | None = None) -> StudySpec:
    """Read and validate a study file. ``data_dir`` (from the CLI) wins over the file's."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise TopoCAMError(f"study file {path} does not exist")
    text = path.read_text()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopoCAMError(f"{where}: not valid TOML ({exc})") from None
    unknown = sorted(set(doc) - {*_SECTIONS, "space", "sampler"})
    if unknown:
        raise TopoCAMError(f"{where}: unknown section(s) {unknown}; allowed: {sorted({*_SECTIONS, 'space', 'sampler'})}")
    st, data, bb, fixed = (_table(doc, s, where) for s in ("study", "data", "backbone", "fixed"))

    name = st.get("name", path.stem)
    if not _NAME.fullmatch(name):
        raise TopoCAMError(
            f"{where}: [study] name {name!r} must start with a letter or digit and hold only letters, digits, '_', '-' and '.'"
        )
    objective = st.get("objective", "val_auc")
    if objective not in OBJECTIVES:
        raise TopoCAMError(f"{where}: [study] objective {objective!r} not one of {list(OBJECTIVES)}")
    n_trials = st.get("n_trials", 50)
    check_n_trials(n_trials, f"{where}: [study] n_trials")
    samplers = check_samplers(st.get("samplers", ["de", "tpe", "cmaes", "random"]), f"{where}: [study] samplers")
    seeds = tuple(st.get("seeds", [0, 1, 2]))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise TopoCAMError(f"{where}: [study] seeds must be a non-empty list of non-negative integers, got {list(seeds)}")
    grace_period = st.get("grace_period", DEFAULT_GRACE_PERIOD)
    if not 4 <= grace_period <= 3600:
        raise TopoCAMError(f"{where}: [study] grace_period must be 4 to 3600 seconds, got {grace_period}")
    replicate_seeds = tuple(dict.fromkeys(st.get("replicate_seeds", [])))
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in replicate_seeds):
        raise TopoCAMError(
            f"{where}: [study] replicate_seeds must be a list of non-negative integers (model seeds), got {list(replicate_seeds)}"
        )

    from ..core.backbone import BACKBONES

    if "arch" in bb and bb["arch"] not in BACKBONES:
        raise TopoCAMError(f"{where}: [backbone] arch {bb['arch']!r} unknown; choose from {list(BACKBONES)}")
    from ..core.backbone import training_recipe

    try:
        recipe = training_recipe(bb.get("preset"), **{k: bb.get(k) for k in ("epochs", "batch_size", "lr", "milestones")})
    except TopoCAMError as exc:
        raise TopoCAMError(f"{where}: [backbone] preset: {exc}") from None
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in recipe["milestones"]):
        raise TopoCAMError(f"{where}: [backbone] milestones must be epochs >= 1, got {list(recipe['milestones'])}")
    synthetic_n = data.get("synthetic_n", list(TopoCAMConfig.synthetic_n))
    if len(synthetic_n) != 3 or not all(isinstance(v, int) and v >= 2 for v in synthetic_n):
        raise TopoCAMError(f"{where}: [data] synthetic_n must be three integers >= 2 (train, val, test), got {synthetic_n}")
    base = TopoCAMConfig(
        dataset=data.get("dataset", "breastmnist"),
        data_dir=data_dir or data.get("data_dir"),
        size=data.get("size", 28),
        synthetic_n=tuple(synthetic_n),
        data_seed=data.get("seed", 0),
        clutter=data.get("clutter", 2),
        backbone=bb.get("arch", "auto"),
        epochs=recipe["epochs"],
        batch_size=recipe["batch_size"],
        lr=float(recipe["lr"]),
        lr_milestones=tuple(recipe["milestones"]),
        seed=bb.get("seed", 0),
        **{k: (float(v) if k in ("mlp_lr", "mlp_weight_decay") else v) for k, v in fixed.items()},
    )
    try:
        base.validated()
    except TopoCAMError as exc:
        raise TopoCAMError(f"{where}: {exc}") from None
    space_doc = doc.get("space", {})
    if not isinstance(space_doc, dict):
        raise TopoCAMError(f"{where}: [space] must hold tables like [space.tau]")
    space = build_space(space_doc, where)

    sampler_doc = doc.get("sampler", {})
    if not isinstance(sampler_doc, dict):
        raise TopoCAMError(f"{where}: [sampler] must hold tables like [sampler.de]")
    options: dict[str, dict[str, Any]] = {}
    for sname, opts in sampler_doc.items():
        if sname != "de":
            raise TopoCAMError(f"{where}: [sampler.{sname}] has no options to set; only [sampler.de] is configurable")
        if not isinstance(opts, dict):
            raise TopoCAMError(f"{where}: [sampler.de] must be a table of options, got {opts!r}")
        unknown = sorted(set(opts) - set(_DE_KEYS))
        if unknown:
            raise TopoCAMError(f"{where}: unknown key(s) {unknown} in [sampler.de]; allowed: {sorted(_DE_KEYS)}")
        options["de"] = {k: _typed("sampler.de", k, v, _DE_KEYS[k], where) for k, v in opts.items()}
        if isinstance(options["de"].get("mutation"), list):
            options["de"]["mutation"] = tuple(options["de"]["mutation"])
        try:  # the sampler checks its options: fail now, not after the backbone has trained
            make_sampler("de", 0, options["de"])
        except TopoCAMError as exc:
            raise TopoCAMError(f"{where}: {exc}") from None
    return StudySpec(name, path, text, base, space, objective, n_trials, samplers, seeds, st.get("description", ""),
                     sampler_options=options, replicate_seeds=replicate_seeds,
                     tune_topo_original=st.get("tune_topo_original", True), grace_period=grace_period)
