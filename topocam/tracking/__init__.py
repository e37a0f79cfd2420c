"""MLflow tracking: the :class:`~topocam.tracking.tracker.Tracker` every command logs through,
and :func:`~topocam.tracking.tracker.resolve_tracking_uri`, the one rule for which store."""

from .tracker import (
    EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, TRACKING_URI_ENV, UI_URL, VIEW_TAG_PREFIX, Tracker, default_tracking_uri,
    flat_metrics, log_topocam_run, metric_key, resolve_tracking_uri, run_experiment_name, tags_filter,
)

__all__ = [
    "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "TRACKING_URI_ENV", "UI_URL", "VIEW_TAG_PREFIX", "Tracker", "default_tracking_uri",
    "flat_metrics", "log_topocam_run", "metric_key", "resolve_tracking_uri", "run_experiment_name", "tags_filter",
]
