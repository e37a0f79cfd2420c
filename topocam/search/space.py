"""The search space over TopoCAM's knobs and its mapping onto a TopoCAMConfig,
both derived from the settings' declarations (``topocam.core.settings``: each
searchable setting's parameters, default ranges and hard bounds).

Default space (the paper's parametrisation): three raw fusion weights in
[0, 1], normalised onto the simplex when the config is built; tau in
[0.3, 0.9]; the CAM variant; two MLP hidden sizes. A study file can narrow a
range, fix a parameter, or add one of the optional parameters (every other
searchable setting: ``tau_mode``, ``outside``, ``bins``, ``mlp_lr``,
``mlp_weight_decay``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import optuna

from ..core.errors import TopoCAMError
from ..core.settings import ROI_STAGES, SETTINGS, Setting, TopoCAMConfig, assemble, searchable


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "float" | "int" | "categorical" | "fixed"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None
    value: Any = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        return self.value


def _params_of(setting: Setting) -> dict[str, Param]:
    """The Optuna parameters that stand for a setting, at their default ranges."""
    if setting.choices:
        choices = setting.search.choices or setting.choices
        return {setting.name: Param(setting.name, "categorical", choices=tuple(choices))}
    kind = "int" if setting.type is int else "float"
    return {name: Param(name, kind, r.low, r.high, log=r.log) for name, r in zip(setting.params, setting.search.ranges)}


DEFAULT_SPACE: dict[str, Param] = {k: v for s in searchable().values() if s.search.default for k, v in _params_of(s).items()}
OPTIONAL_SPACE: dict[str, Param] = {k: v for s in searchable().values() if not s.search.default for k, v in _params_of(s).items()}
SETTING_OF: dict[str, str] = {p: s.name for s in searchable().values() for p in s.params}  # parameter -> setting
BOUNDS = {p: SETTINGS[s].search_bounds for p, s in SETTING_OF.items() if not SETTINGS[s].choices}  # hard limits
CHOICES = {p: SETTINGS[s].choices for p, s in SETTING_OF.items() if SETTINGS[s].choices}
WEIGHT_PARAMS = SETTINGS["weights"].params
ROI_PARAMS = tuple(p for p, s in SETTING_OF.items() if SETTINGS[s].stage in ROI_STAGES)  # Topo-Original's space is the rest


def parse_param(name: str, spec: dict, where: str) -> Param:
    """One ``[space.NAME]`` table: ``low``/``high``/``log``, ``choices`` or ``fixed``."""
    known = {**DEFAULT_SPACE, **OPTIONAL_SPACE}
    if name not in known:
        raise TopoCAMError(f"{where}: unknown search parameter [space.{name}]; known: {', '.join(known)}")
    base = known[name]
    if not isinstance(spec, dict):
        raise TopoCAMError(f"{where}: [space.{name}] must be a table (low/high, choices or fixed)")
    allowed = {"fixed"} | ({"choices"} if base.kind == "categorical" else {"low", "high", "log"})
    extra = set(spec) - allowed
    if extra:
        raise TopoCAMError(f"{where}: unknown key(s) {sorted(extra)} in [space.{name}]; allowed: {sorted(allowed)}")
    if "fixed" in spec:
        if len(spec) > 1:
            raise TopoCAMError(f"{where}: [space.{name}] has 'fixed' and a range; give one of them")
        value = spec["fixed"]
        if base.kind == "categorical":
            if value not in CHOICES[name]:
                raise TopoCAMError(f"{where}: [space.{name}] fixed = {value!r} is not one of {list(CHOICES[name])}")
        else:
            _check_number(name, value, base.kind, where, "fixed")
        return Param(name, "fixed", value=value)
    if base.kind == "categorical":
        choices = spec.get("choices", list(base.choices))
        if not isinstance(choices, list) or not choices:
            raise TopoCAMError(f"{where}: [space.{name}] choices must be a non-empty list")
        bad = [c for c in choices if c not in CHOICES[name]]
        if bad:
            raise TopoCAMError(f"{where}: [space.{name}] choices {bad} not among {list(CHOICES[name])}")
        return Param(name, "categorical", choices=tuple(dict.fromkeys(choices)))
    low = spec.get("low", base.low)
    high = spec.get("high", base.high)
    log = spec.get("log", base.log)
    _check_number(name, low, base.kind, where, "low")
    _check_number(name, high, base.kind, where, "high")
    if not isinstance(log, bool):
        raise TopoCAMError(f"{where}: [space.{name}] log must be true or false, got {log!r}")
    if not low < high:
        raise TopoCAMError(f"{where}: [space.{name}] is an empty range: low {low} must be below high {high} (use fixed = ... for one value)")
    if log and low <= 0:
        raise TopoCAMError(f"{where}: [space.{name}] log range needs low > 0, got {low}")
    return Param(name, base.kind, low=low, high=high, log=log)


def _check_number(name: str, v: Any, kind: str, where: str, key: str) -> None:
    ok = isinstance(v, int) if kind == "int" else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise TopoCAMError(f"{where}: [space.{name}] {key} must be {'an integer' if kind == 'int' else 'a number'}, got {v!r}")
    lo, hi = BOUNDS[name]
    if not lo <= v <= hi:
        raise TopoCAMError(f"{where}: [space.{name}] {key} = {v} is outside [{lo}, {hi}]")


def build_space(overrides: dict[str, dict], where: str) -> dict[str, Param]:
    space = dict(DEFAULT_SPACE)
    for name, spec in overrides.items():
        space[name] = parse_param(name, spec, where)
    weights_fixed = [space[w] for w in WEIGHT_PARAMS if space[w].kind == "fixed"]
    if len(weights_fixed) == 3 and sum(float(p.value) for p in weights_fixed) <= 0:
        raise TopoCAMError(f"{where}: all three fusion weights are fixed at 0; at least one must be positive")
    return space


def suggest(trial: optuna.Trial, space: dict[str, Param]) -> dict[str, Any]:
    """Ask the trial for every searched parameter (fixed ones are returned as is)."""
    return {name: p.suggest(trial) for name, p in space.items()}


def apply_params(base: TopoCAMConfig, params: dict[str, Any]) -> TopoCAMConfig:
    """The configuration a set of parameters stands for: each setting whose parameters
    are all given takes their value (``settings.assemble``); the others keep the base's
    (Topo-Original's space has no fusion weights, say). Raw weights that are all zero
    fall back to equal weights (a defined point, not a failed trial)."""
    changes = {
        s.name: assemble(s.name, [params[p] for p in s.params])
        for s in searchable().values() if all(p in params for p in s.params)
    }
    return dataclasses.replace(base, **changes)


def arm_space(space: dict[str, Param], method: str) -> dict[str, Param]:
    """The part of a study's space a method has: TopoCAM all of it, Topo-Original (the
    whole image, no CAM) everything but the fusion weights, tau and the CAM variant, so
    the baseline gets the same sampler, budget and MLP search (DESIGN.md §2.9)."""
    if method == "topocam":
        return dict(space)
    return {k: p for k, p in space.items() if k not in ROI_PARAMS}
