"""Which Optuna trials count as scored: the one filter the runner, the status
table and the export use to pick the best trial."""

from __future__ import annotations

import math
from collections.abc import Iterable

from optuna.trial import FrozenTrial, TrialState


def is_scored(trial: FrozenTrial) -> bool:
    """A completed trial with a finite objective value."""
    return trial.state == TrialState.COMPLETE and trial.value is not None and math.isfinite(trial.value)


def scored_trials(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The completed trials with a finite objective value, in the given order."""
    return [t for t in trials if is_scored(t)]
