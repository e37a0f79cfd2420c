"""Which Optuna trials count as scored (the one filter the runner, the status table and
the export use to pick the best trial), and which count toward a study's budget."""

from __future__ import annotations

import math
from collections.abc import Iterable

from optuna.trial import FrozenTrial, TrialState

ATTR_ERROR = "error"  # user attr of a trial its configuration failed: what went wrong
ATTR_STOPPED = "stopped"  # user attr of a trial its worker stopped (Ctrl-C, disk): why; it is re-queued


def is_scored(trial: FrozenTrial) -> bool:
    """A completed trial with a finite objective value."""
    return trial.state == TrialState.COMPLETE and trial.value is not None and math.isfinite(trial.value)


def scored_trials(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The completed trials with a finite objective value, in the given order."""
    return [t for t in trials if is_scored(t)]


def counts(t: FrozenTrial) -> bool:
    """Whether a trial uses up budget: it finished (COMPLETE, PRUNED), or its configuration
    failed (FAIL with an ``error``: a broken configuration cannot loop forever). A trial lost
    with its worker (killed, interrupted: FAIL without ``error``) does not; it is re-run."""
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and ATTR_ERROR in t.user_attrs)
