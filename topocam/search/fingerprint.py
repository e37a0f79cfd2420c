"""What makes a study's trials comparable, recorded with each Optuna study and checked on resume.

A study that already exists is continued (same name in the same storage) only if it was
defined the same way: the objective, the fixed configuration and the search space
(:func:`definition`) are stored as user attributes of the Optuna study, with a short hash, and
a mismatch is an error naming what changed rather than a silent mix of incomparable trials.
The export reads the same attribute to find the studies a study file ran.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna

from ..core.errors import TopoCAMError
from ..core.settings import SETTINGS, TopoCAMConfig
from .studyfile import StudySpec

ATTR_DEFINITION = "topocam_definition"


def definition(spec: StudySpec) -> dict[str, Any]:
    """What makes trials comparable: objective, fixed configuration and search space
    (not where the data lives, the cache folder or the number of CPU jobs)."""
    base = spec.base.as_dict()
    for k in ("data_dir", "cache_dir", "n_jobs"):
        base.pop(k, None)
    defaults = TopoCAMConfig().as_dict()
    for k, s in SETTINGS.items():  # settings studies did not record from the start: left out at their
        if not s.in_definition_at_default and base.get(k) == defaults[k]:  # defaults, so stored studies resume
            base.pop(k, None)
    space = {k: {a: v for a, v in vars(p).items() if v is not None and a != "name"} for k, p in sorted(spec.space.items())}
    return json.loads(json.dumps({"objective": spec.objective, "base": base, "space": space}, sort_keys=True, default=str))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: d}


def check_definition(study: optuna.Study, spec: StudySpec, arm: str, sampler: str, seed: int, storage_url: str) -> None:
    """Resume only a study defined the same way; record the definition of a new one."""
    attrs = study.user_attrs
    for k, want in (("topocam_study", spec.name), ("sampler", sampler), ("seed", seed)):
        if k in attrs and attrs[k] != want:
            raise TopoCAMError(
                f"Optuna study {study.study_name!r} in {storage_url} belongs to {k} {attrs[k]!r}, not {want!r}; "
                "rename [study] name or use another --storage"
            )
    mine = definition(spec)
    stored = attrs.get(ATTR_DEFINITION)
    if stored is None:
        for k, v in {"topocam_study": spec.name, "arm": arm, "sampler": sampler, "seed": seed,
                     "objective": spec.objective,
                     ATTR_DEFINITION: mine,
                     "topocam_definition_sha": hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()[:16]}.items():
            study.set_user_attr(k, v)
        return
    if stored != mine:
        a, b = _flatten(stored), _flatten(mine)
        changed = [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise TopoCAMError(
            f"{spec.path}: study {study.study_name!r} in {storage_url} was run with a different definition "
            f"({'; '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}); its trials would not be comparable. "
            "Rename [study] name for the new definition, or use another --storage"
        )
