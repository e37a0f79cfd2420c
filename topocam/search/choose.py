"""Which trial a study stands for: the best completed trial by its validation
objective (ties to the lower trial number, then the first (sampler, seed) in name
order), or one the user names. Test metrics take no part. Reads the storage only;
``export`` and ``ablate`` both choose through it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..core.errors import TopoCAMError
from ..stores import redact_url
from .fingerprint import ATTR_DATA, ATTR_DEFINITION, definition
from .space import arm_space
from .storage import open_storage
from .trials import is_scored, scored_trials


@dataclass
class Choice:
    """The trial to export and where it came from."""

    optuna_study: str
    sampler: str
    seed: int
    trial: int
    value: float
    params: dict[str, Any]
    how: str  # "best of ..." or "named"
    definition_sha: str | None = None
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)  # the Optuna study's user attributes
    val: dict[str, float] = dataclasses.field(default_factory=dict)  # the trial's validation metrics at the search
    trial_attrs: dict[str, Any] = dataclasses.field(default_factory=dict)  # the trial's user attributes (its model's digests)

    @property
    def data_fingerprint(self) -> str | None:
        """Fingerprint of the data the trial was scored on (None: a study from before it was recorded)."""
        return self.attrs.get(ATTR_DATA)


def choose_trial(spec, storage_url: str, sampler: str | None = None, seed: int | None = None,
                 trial: int | None = None, arm: str = "topocam") -> Choice:
    """The trial to export (see the module doc). Reads the storage only. ``arm``:
    "topo_original" chooses among the equal-budget Topo-Original searches instead."""
    import optuna

    if arm != "topocam":
        spec = dataclasses.replace(spec, base=dataclasses.replace(spec.base, method=arm), space=arm_space(spec.space, arm))

    storage = open_storage(storage_url, read_only=True)
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    mine = sorted(
        (s for s in summaries if s.user_attrs.get("topocam_study") == spec.name
         and s.user_attrs.get("arm", "topocam") == arm  # TopoCAM's searches, or the Topo-Original baseline's
         and (sampler is None or s.user_attrs.get("sampler") == sampler)
         and (seed is None or s.user_attrs.get("seed") == seed)),
        key=lambda s: (str(s.user_attrs.get("sampler")), int(s.user_attrs.get("seed", -1))),
    )
    which = " and ".join(x for x in (f"sampler {sampler}" if sampler else "", f"seed {seed}" if seed is not None else "") if x)
    if not mine:
        raise TopoCAMError(
            f"no trials of study {spec.name!r}{' for ' + which if which else ''} in {redact_url(storage_url)}; "
            f"run `topocam study run {spec.path}` first, or check --storage / --sampler / --seed"
        )
    want = definition(spec)
    for s in mine:
        if s.user_attrs.get(ATTR_DEFINITION) != want:
            raise TopoCAMError(
                f"{spec.path} differs from the definition study {s.study_name!r} was run with "
                "(objective, fixed settings or search space); export with the study file its trials were run with"
            )
    if trial is not None and len(mine) > 1:
        raise TopoCAMError(
            f"--trial {trial} is ambiguous: trial numbers are per (sampler, seed) and {len(mine)} of them are stored "
            f"({', '.join(s.study_name for s in mine)}); add --sampler and --seed"
        )
    fixed = {k: p.value for k, p in spec.space.items() if p.kind == "fixed"}
    best: tuple | None = None
    for s in mine:
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        if trial is not None:
            found = [t for t in trials if t.number == trial]
            if not found:
                raise TopoCAMError(f"study {s.study_name!r} has no trial {trial} (it has {len(trials)} trials, numbered from 0)")
            t = found[0]
            if not is_scored(t):
                raise TopoCAMError(f"trial {trial} of {s.study_name!r} is {t.state.name}, without an objective value; pick a completed trial")
            best = (t.value, s, t)
            break
        for t in scored_trials(trials):
            if best is None or t.value > best[0]:  # trials come in number order: ties keep the earlier
                best = (t.value, s, t)
    if best is None:
        raise TopoCAMError(f"no completed trial with a finite objective in {', '.join(s.study_name for s in mine)}")
    value, s, t = best
    how = (f"trial {t.number} named by the user" if trial is not None else
           f"best {spec.objective} over {', '.join(x.study_name for x in mine)} (validation only; test never used)")
    val = {k[4:]: float(v) for k, v in t.user_attrs.items() if k.startswith("val_") and isinstance(v, (int, float))}
    return Choice(s.study_name, str(s.user_attrs.get("sampler")), int(s.user_attrs.get("seed")), t.number, float(value),
                  {**fixed, **t.params}, how, s.user_attrs.get("topocam_definition_sha"), dict(s.user_attrs), val,
                  dict(t.user_attrs))
