"""The search space over TopoCAM's knobs and its mapping onto a TopoCAMConfig.

Default space (the paper's parametrisation): three raw fusion weights in
[0, 1], normalised onto the simplex when the config is built; tau in
[0.3, 0.9]; the CAM variant; two MLP hidden sizes. A study file can narrow a
range, fix a parameter, or add one of the optional parameters
(``mlp_lr``, ``mlp_weight_decay``, ``outside``, ``bins``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import optuna

from ..core.cam import CAM_VARIANTS
from ..core.errors import TopoCAMError
from ..core.pipeline import TopoCAMConfig
from ..core.topology import OUTSIDE_MODES

WEIGHT_PARAMS = ("w_layer2", "w_layer3", "w_layer4")
ROI_PARAMS = (*WEIGHT_PARAMS, "tau", "cam")  # what only TopoCAM has: Topo-Original's space is the rest


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


# name -> (kind, default range or choices, validator of fixed values/choices)
DEFAULT_SPACE: dict[str, Param] = {
    "w_layer2": Param("w_layer2", "float", 0.0, 1.0),
    "w_layer3": Param("w_layer3", "float", 0.0, 1.0),
    "w_layer4": Param("w_layer4", "float", 0.0, 1.0),
    "tau": Param("tau", "float", 0.3, 0.9),
    "cam": Param("cam", "categorical", choices=CAM_VARIANTS),
    "mlp_h1": Param("mlp_h1", "int", 16, 256, log=True),
    "mlp_h2": Param("mlp_h2", "int", 8, 128, log=True),
}
OPTIONAL_SPACE: dict[str, Param] = {
    "mlp_lr": Param("mlp_lr", "float", 1e-4, 1e-2, log=True),
    "mlp_weight_decay": Param("mlp_weight_decay", "float", 1e-6, 1e-2, log=True),
    "outside": Param("outside", "categorical", choices=OUTSIDE_MODES),
    "bins": Param("bins", "int", 20, 100),
}
BOUNDS = {  # hard limits every range must respect
    "w_layer2": (0.0, 1.0), "w_layer3": (0.0, 1.0), "w_layer4": (0.0, 1.0), "tau": (0.0, 1.0),
    "mlp_h1": (1, 4096), "mlp_h2": (1, 4096), "mlp_lr": (1e-6, 1.0), "mlp_weight_decay": (0.0, 1.0), "bins": (2, 1000),
}
CHOICES = {"cam": CAM_VARIANTS, "outside": OUTSIDE_MODES}


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
    """The configuration a set of parameters stands for. Raw weights that are
    all zero fall back to equal weights (a defined point, not a failed trial)."""
    changes: dict[str, Any] = {"mlp": (int(params["mlp_h1"]), int(params["mlp_h2"]))}
    if all(w in params for w in WEIGHT_PARAMS):  # absent in Topo-Original's space: the base's stay
        raw = [float(params[w]) for w in WEIGHT_PARAMS]
        changes["weights"] = tuple(raw) if sum(raw) > 0 else (1.0, 1.0, 1.0)
    if "tau" in params:
        changes["tau"] = float(params["tau"])
    if "cam" in params:
        changes["cam"] = params["cam"]
    for opt in ("mlp_lr", "mlp_weight_decay", "outside", "bins"):
        if opt in params:
            changes[opt] = params[opt]
    return dataclasses.replace(base, **changes)


def arm_space(space: dict[str, Param], method: str) -> dict[str, Param]:
    """The part of a study's space a method has: TopoCAM all of it, Topo-Original (the
    whole image, no CAM) everything but the fusion weights, tau and the CAM variant, so
    the baseline gets the same sampler, budget and MLP search (DESIGN.md §2.9)."""
    if method == "topocam":
        return dict(space)
    return {k: p for k, p in space.items() if k not in ROI_PARAMS}
