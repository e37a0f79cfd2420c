"""What a study looks like from its storage: the status report (``topocam study status``), the
failed trials grouped by error, and the trial bar a worker shows while it searches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna

from ..core.errors import TopoCAMError
from .artifacts import RECORD_OF
from .samplers import SAMPLERS
from .storage import open_storage, quiet_experimental
from .trials import ATTR_ERROR, counts, scored_trials

S = optuna.trial.TrialState


def study_status(name: str, storage_url: str) -> list[dict[str, Any]]:
    """One row per (sampler, seed) study of ``name``: trial counts and best value."""
    storage = open_storage(storage_url, read_only=True)
    with quiet_experimental():
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    summaries = [s for s in summaries if RECORD_OF not in s.user_attrs]  # a study's published-model record: no trials
    owner = {s.study_name: s.user_attrs.get("topocam_study", _owner_from_name(s.study_name)) for s in summaries}
    mine = sorted(n for n, o in owner.items() if o == name)
    if not mine:
        known = sorted(set(owner.values()))
        raise TopoCAMError(f"no study named {name!r} in {storage_url}; studies there: {', '.join(known) or 'none'}")
    rows = [_status_row(optuna.load_study(study_name=n, storage=storage)) for n in mine]
    return sorted(rows, key=lambda r: (str(r["sampler"]), r["seed"] if isinstance(r["seed"], int) else -1, r["study"]))


def _owner_from_name(optuna_study: str) -> str:
    """``<study>.<sampler>.s<seed>`` -> ``<study>`` (studies written before user attrs were recorded)."""
    parts = optuna_study.rsplit(".", 2)
    if len(parts) == 3 and parts[1] in SAMPLERS and parts[2][:1] == "s" and parts[2][1:].isdigit():
        return parts[0]
    return optuna_study


def _status_row(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    count = {st: sum(t.state == st for t in trials) for st in (S.COMPLETE, S.RUNNING, S.FAIL, S.PRUNED, S.WAITING)}
    good = scored_trials(trials)
    best = max(good, key=lambda t: (t.value, -t.number)) if good else None
    parts = study.study_name.rsplit(".", 2)
    sampler = study.user_attrs.get("sampler", parts[1] if len(parts) == 3 else "?")
    seed = study.user_attrs.get("seed", int(parts[2][1:]) if len(parts) == 3 and parts[2][1:].isdigit() else "?")
    return {"study": study.study_name, "sampler": sampler, "seed": seed, "trials": len(trials),
            "complete": count[S.COMPLETE], "running": count[S.RUNNING], "failed": count[S.FAIL], "pruned": count[S.PRUNED],
            "waiting": count[S.WAITING], "best_value": float(best.value) if best else float("nan"),
            "best_trial": best.number if best else -1}


def failure_groups(trials: Sequence[optuna.trial.FrozenTrial]) -> list[dict[str, Any]]:
    """Failed trials grouped by error message, each group with the parameter values
    ALL its trials share: a CAM variant that always fails shows as ``{"cam": "scorecam"}``.
    Largest groups first."""
    groups: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for t in trials:
        if t.state == S.FAIL:
            groups.setdefault(str(t.user_attrs.get(ATTR_ERROR, "worker stopped during the trial (no error recorded)")), []).append(t)
    out = []
    for message, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        first = members[0].params
        shared = {k: v for k, v in first.items() if all(k in m.params and m.params[k] == v for m in members)}
        out.append({"error": message, "count": len(members), "trials": [m.number for m in members],
                    "shared_params": shared if len(members) > 1 else {}})
    return out


class TrialBar:
    """tqdm bar over the budget with the best value so far and the failures (ETA from tqdm)."""

    def __init__(self, total: int, done: int, desc: str, enabled: bool, study: optuna.Study):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=min(done, total), desc=desc, unit="trial", disable=not enabled, leave=True)
        self._postfix(study)

    def _postfix(self, study: optuna.Study) -> None:
        trials = [t for t in study.get_trials(deepcopy=False) if counts(t)]
        good = [t.value for t in scored_trials(trials)]
        post = {"best": f"{max(good):.4f}" if good else "—"}
        failed = sum(t.state == S.FAIL for t in trials)
        if failed:
            post["failed"] = failed
        self.bar.set_postfix(post)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.bar.n < self.bar.total:
            self.bar.update(1)
        self._postfix(study)

    def close(self) -> None:
        self.bar.close()
