"""MLflow tracking: the :class:`~topocam.tracking.tracker.Tracker` every command logs through."""

from .tracker import (
    EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, UI_URL, VIEW_TAG_PREFIX, Tracker, default_tracking_uri, flat_metrics,
    log_topocam_run, metric_key, run_experiment_name, tags_filter,
)

__all__ = [
    "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "UI_URL", "VIEW_TAG_PREFIX", "Tracker", "default_tracking_uri", "flat_metrics",
    "log_topocam_run", "metric_key", "run_experiment_name", "tags_filter",
]
