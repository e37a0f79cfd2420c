"""What makes a study's trials comparable, recorded with each Optuna study and checked on resume.

A study that already exists is continued (same name in the same storage) only if it was
defined the same way: the objective, the fixed configuration and the search space
(:func:`definition`) are stored as user attributes of the Optuna study, with a short hash, and
a mismatch is an error naming what changed rather than a silent mix of incomparable trials.
The export reads the same attribute to find the studies a study file ran.

One study name, one definition: a new Optuna study of a name (another sampler, seed or arm)
is created only if every Optuna study of that name in the storage was defined the same way
(:func:`check_name`, arm for arm: the Topo-Original arm's definition is compared with this
file's Topo-Original definition, TopoCAM's with TopoCAM's) and scored on the same data.

What was scored is what is stored: a new Optuna study records the content fingerprint of
its dataset (``Dataset.fingerprint``, user attribute ``topocam_data_fingerprint``); a study
is resumed, exported, ablated or explained only on data with that fingerprint
(:func:`check_data`). A study created before the fingerprint was recorded has none: that
is said in one warning line, and the data cannot be checked.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna

from ..core.errors import TopoCAMError
from ..core.settings import SETTINGS, TopoCAMConfig
from ..stores import redact_url
from .studyfile import StudySpec

ATTR_DEFINITION = "topocam_definition"
ATTR_DATA = "topocam_data_fingerprint"  # Dataset.fingerprint of the data the study's trials were scored on


def definition(spec: StudySpec) -> dict[str, Any]:
    """What makes trials comparable: objective, fixed configuration and search space
    (not where the data lives, the cache folder, the number of CPU jobs or the device)."""
    base = spec.base.as_dict()
    for k in ("data_dir", "cache_dir", "n_jobs", "device"):  # a GPU worker and a CPU worker score one study
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


def arm_spec(spec: StudySpec, arm: str) -> StudySpec:
    """The study (as its file defines it) as searched by ``arm``: "topocam", the file itself;
    another arm, its method and its part of the space (``space.arm_space``)."""
    from dataclasses import replace

    from .space import arm_space

    if arm == "topocam":
        return spec
    return replace(spec, base=replace(spec.base, method=arm), space=arm_space(spec.space, arm))


def changes(stored: dict, mine: dict) -> str:
    """What differs between two definitions, as ``key: old -> new; ...`` (at most 8)."""
    a, b = _flatten(stored), _flatten(mine)
    changed = [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return f"{'; '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}"


def check_attrs(name: str, attrs: dict[str, Any], spec: StudySpec, sampler: str, seed: int, storage_url: str) -> None:
    """An existing Optuna study ``name`` (its user attributes) belongs to this study, sampler
    and seed, and was defined as ``spec`` defines it (when it recorded a definition)."""
    for k, want in (("topocam_study", spec.name), ("sampler", sampler), ("seed", seed)):
        if k in attrs and attrs[k] != want:
            raise TopoCAMError(
                f"Optuna study {name!r} in {redact_url(storage_url)} belongs to {k} {attrs[k]!r}, not {want!r}; "
                "rename [study] name or use another --storage"
            )
    stored = attrs.get(ATTR_DEFINITION)
    if stored is not None and stored != definition(spec):
        raise TopoCAMError(
            f"{spec.path}: study {name!r} in {redact_url(storage_url)} was run with a different definition "
            f"({changes(stored, definition(spec))}); its trials would not be comparable. "
            "Rename [study] name for the new definition, or use another --storage"
        )


def check_definition(study: optuna.Study, spec: StudySpec, arm: str, sampler: str, seed: int, storage_url: str,
                     data_fingerprint: str | None = None) -> None:
    """Resume only a study defined the same way; record the definition (and the dataset's
    fingerprint) of a new one."""
    attrs = study.user_attrs
    check_attrs(study.study_name, attrs, spec, sampler, seed, storage_url)
    if attrs.get(ATTR_DEFINITION) is None:
        mine = definition(spec)
        for k, v in {"topocam_study": spec.name, "arm": arm, "sampler": sampler, "seed": seed,
                     "objective": spec.objective,
                     ATTR_DEFINITION: mine,
                     "topocam_definition_sha": hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()[:16],
                     **({ATTR_DATA: data_fingerprint} if data_fingerprint else {})}.items():
            study.set_user_attr(k, v)


def check_data(attrs: dict[str, Any], study_name: str, data, log=print) -> None:
    """``data`` (a Dataset) is what Optuna study ``study_name`` (its user attributes) was scored
    on: the same content fingerprint, else an error naming both and the file. A study that
    recorded none is said in one warning line through ``log``."""
    recorded = attrs.get(ATTR_DATA)
    if recorded is None:
        log(f"warning: Optuna study {study_name!r} records no dataset fingerprint (created before topocam recorded one): "
            f"cannot check that {data.source} (fingerprint {data.fingerprint}) is the data its trials were scored on")
        return
    if recorded != data.fingerprint:
        raise TopoCAMError(
            f"{data.source} has content fingerprint {data.fingerprint}, but Optuna study {study_name!r} was scored on data "
            f"with fingerprint {recorded}: the data changed since the study ran; restore the data it ran on, or run a new "
            "study (another [study] name) on this data"
        )


def check_name(summaries, spec: StudySpec, new_study: str, storage_url: str, data=None) -> None:
    """Before Optuna study ``new_study`` is created for ``spec`` (the study-level spec, all
    arms): every other Optuna study of the same ``[study] name`` in the storage (``summaries``:
    ``optuna.get_all_study_summaries``) must have been defined as ``spec`` defines its arm,
    and scored on ``data`` (a Dataset, where given), whatever its sampler, seed or arm."""
    for s in sorted(summaries, key=lambda s: s.study_name):
        attrs = s.user_attrs
        if attrs.get("topocam_study") != spec.name or s.study_name == new_study:
            continue
        stored, arm = attrs.get(ATTR_DEFINITION), attrs.get("arm", "topocam")
        mine = definition(arm_spec(spec, arm))
        if stored is not None and stored != mine:
            raise TopoCAMError(
                f"{spec.path}: study name {spec.name!r} is already used in {redact_url(storage_url)} by Optuna study "
                f"{s.study_name!r} with another definition ({changes(stored, mine)}); one name holds one definition: "
                "rename [study] name for the new definition, or use another --storage"
            )
        recorded = attrs.get(ATTR_DATA)
        if data is not None and recorded is not None and recorded != data.fingerprint:
            raise TopoCAMError(
                f"{spec.path}: study name {spec.name!r} is already used in {redact_url(storage_url)} by Optuna study "
                f"{s.study_name!r}, scored on data with fingerprint {recorded}; {data.source} has fingerprint "
                f"{data.fingerprint}: restore the data it ran on, or rename [study] name for the new data"
            )
