"""Study definitions (``studies/*.toml``): parsed strictly, errors name the key and the file.

    [study]     name, objective (val_auc | val_acc | cv_auc | cv_acc), n_trials, samplers, seeds, replicate_seeds,
                tune_topo_original (default true), description, grace_period (seconds, default 20)
    [data]      the data settings: dataset, data_dir, size, synthetic_n, data_seed (synthetic data seed), clutter
    [backbone]  the backbone settings: backbone, epochs, batch_size, lr, lr_milestones, seed, init; and preset
                (medmnist_v2; explicit keys win)
    [fixed]     every other setting a study may fix (tau, cam, weights, tau_mode, outside, bins, mlp, ...)
    [space.P]   narrow (low/high/log or choices), fix (fixed = v) or add a parameter
    [sampler.de] popsize_per_dim, strategy, mutation, recombination, updating (deferred | immediate)

The keys of [data], [backbone] and [fixed] are the settings' own names
(``topocam.core.settings``: the `topocam run` options, the ablation arm keys).
Files written before may use the old names (``[data] seed``, ``[backbone] arch``,
``[backbone] milestones``): they are read as ``data_seed``, ``backbone`` and
``lr_milestones``, with a one-line deprecation notice, so stored studies resume.

``[fixed]`` is the base configuration: what the baselines (CNN, Topo-Original)
use and what every trial uses unless a ``[space.X]`` table searches or fixes X.

The backbone seed is a property of the study, so every sampler and every
sampler seed optimises the same objective: the comparison measures the
optimisers, not the luck of the backbone.
"""

from __future__ import annotations

import re
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import DeprecatedKeyWarning, StudyFileWarning, TopoCAMError
from ..core.settings import SECTIONS, TopoCAMConfig, in_section, old_keys, recipe_settings
from ..core.choices import check_n_trials
from .samplers import check_samplers, make_sampler
from .space import SETTING_OF, Param, build_space

DEFAULT_GRACE_PERIOD = 20  # seconds; heartbeats every grace_period // 4
OBJECTIVES = ("val_auc", "val_acc", "cv_auc", "cv_acc")  # cv_*: 5-fold on the training split
_STUDY_KEYS: dict[str, type | tuple] = {
    "name": str, "objective": str, "n_trials": int, "samplers": list, "seeds": list, "replicate_seeds": list,
    "tune_topo_original": bool, "description": str, "grace_period": int,
}
_EXTRA_KEYS = {"backbone": {"preset": str}}  # keys of a settings table that are not settings themselves
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


def _study_table(doc: dict, where: str) -> dict:
    t = doc.get("study", {})
    if not isinstance(t, dict):
        raise TopoCAMError(f"{where}: [study] must be a table")
    unknown = sorted(set(t) - set(_STUDY_KEYS))
    if unknown:
        raise TopoCAMError(f"{where}: unknown key(s) {unknown} in [study]; allowed: {sorted(_STUDY_KEYS)}")
    return {k: _typed("study", k, v, _STUDY_KEYS[k], where) for k, v in t.items()}


def settings_table(doc: dict, section: str, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``[section]`` as (settings by name, checked against their declarations; the
    section's other keys). Old key names are read as the settings they now are, with
    a one-line deprecation notice; an old and a new name for one setting is an error."""
    t = doc.get(section, {})
    if not isinstance(t, dict):
        raise TopoCAMError(f"{where}: [{section}] must be a table")
    settings, extra, renamed = in_section(section), _EXTRA_KEYS.get(section, {}), old_keys(section)
    unknown = sorted(set(t) - set(settings) - set(extra) - set(renamed))
    if unknown:
        raise TopoCAMError(f"{where}: unknown key(s) {unknown} in [{section}]; allowed: {sorted({*settings, *extra})}")
    values: dict[str, Any] = {}
    for key, value in t.items():
        if key in extra:
            continue
        name = renamed.get(key, key)
        if key in renamed:
            if name in t:
                raise TopoCAMError(f"{where}: [{section}] has both {key} (the old name) and {name}; keep {name}")
            warnings.warn(DeprecatedKeyWarning(
                f"{where}: [{section}] {key} is now called {name}; the old name is still read, rename it to {name}"), stacklevel=2)
        values[name] = settings[name].check(value, f"{where}: [{section}] ", key)
    return values, {k: _typed(section, k, v, extra[k], where) for k, v in t.items() if k in extra}


def _warn_fixed_but_searched(fixed: dict[str, Any], space: dict[str, Param], written: set[str], where: str) -> None:
    """``[fixed] cam = "gradcam"`` sets the base configuration (the baselines', the reference's), but a
    setting the default space still searches is drawn afresh by every trial: say so, with the table that
    fixes it for trials (a study once spent 90 minutes on Score-CAM maps its author believed fixed away).
    A parameter the file searches in a ``[space.P]`` table of its own (``written``) is searched knowingly."""
    for name, value in fixed.items():
        searched = [p for p, s in SETTING_OF.items()
                    if s == name and p in space and space[p].kind != "fixed" and p not in written]
        if searched:
            how = " and ".join(f"[space.{p}] fixed = ..." for p in searched)
            warnings.warn(StudyFileWarning(
                f"{where}: [fixed] {name} = {value!r} sets the base configuration only; trials still search "
                f"{', '.join(searched)}. To fix it for trials too, write {how}"), stacklevel=2)


def folder_given(path: Path, what: str) -> str:
    """The message for a folder given where a TOML file was expected, naming the .toml files in it."""
    try:
        found = sorted(p for p in path.glob("*.toml") if p.is_file())
    except OSError:
        found = []
    if not found:
        return f"{what} {path} is a folder, not a file; pass a {what} (TOML)"
    if len(found) == 1:
        return f"{what} {path} is a folder, not a file; did you mean {found[0]}?"
    more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
    return f"{what} {path} is a folder, not a file; did you mean one of {', '.join(map(str, found[:5]))}{more}?"


def load_study(path: str | Path, data_dir: str | None = None) -> StudySpec:
    """Read and validate a study file. ``data_dir`` (from the CLI) wins over the file's."""
    path = Path(path)
    where = str(path)
    if path.is_dir():
        raise TopoCAMError(folder_given(path, "study file"))
    if not path.is_file():
        raise TopoCAMError(f"study file {path} does not exist")
    text = path.read_text()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopoCAMError(f"{where}: not valid TOML ({exc})") from None
    allowed_sections = {"study", *SECTIONS, "space", "sampler"}
    unknown = sorted(set(doc) - allowed_sections)
    if unknown:
        raise TopoCAMError(f"{where}: unknown section(s) {unknown}; allowed: {sorted(allowed_sections)}")
    st = _study_table(doc, where)
    (data, _), (bb, bb_extra), (fixed, _) = (settings_table(doc, s, where) for s in SECTIONS)

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

    from ..core.backbone import training_recipe

    recipe_of = recipe_settings()
    try:
        recipe = training_recipe(bb_extra.get("preset"), **{k: bb.get(s.name) for k, s in recipe_of.items()})
    except TopoCAMError as exc:
        raise TopoCAMError(f"{where}: [backbone] preset: {exc}") from None
    recipe = {recipe_of[k].name: recipe_of[k].check(v, f"{where}: [backbone] ") for k, v in recipe.items()}
    base = TopoCAMConfig(**{**data, **bb, **recipe, **fixed, **({"data_dir": data_dir} if data_dir else {})})
    try:
        base.validated()
    except TopoCAMError as exc:
        raise TopoCAMError(f"{where}: {exc}") from None
    space_doc = doc.get("space", {})
    if not isinstance(space_doc, dict):
        raise TopoCAMError(f"{where}: [space] must hold tables like [space.tau]")
    space = build_space(space_doc, where)
    _warn_fixed_but_searched(fixed, space, set(space_doc), where)

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
