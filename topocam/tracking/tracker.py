"""MLflow tracking: the :class:`Tracker` (naming, tags, logging), the runs-table link, and the
log of a ``topocam run``. What a study logs, and in which runs, is :mod:`topocam.search.mlflow_runs`.

``topocam run`` logs to one experiment per dataset (``run-<dataset>``): a parent run
(``kind=run``) with the summary over seeds and a nested run per seed.

In the MLflow UI: every experiment is tagged a model-training experiment
(``mlflow.experimentKind``), and :meth:`Tracker.runs_table_url` gives the one
link the CLI prints: the runs table with the runs to compare and their metric
columns already chosen, in a browser that has never opened MLflow before.

Which store: :func:`resolve_tracking_uri`, the one rule every command follows (an explicit
URI, else ``$MLFLOW_TRACKING_URI``, else SQLite under the runs folder, ``mlruns/mlflow.db``,
with artifacts beside it in ``mlruns/artifacts``). All calls go through
``MlflowClient`` with explicit run ids: no global active run, so trials from
several threads or workers cannot cross wires. Metric and parameter
names are made MLflow-safe (``best_val_auc@25%`` -> ``best_val_auc_at25pct``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

from ..core.atomic import json_safe
from ..core.errors import DamagedStoreWarning, TopoCAMError
from ..core.locks import FileLock
from ..stores import DEFAULT_RUNS_DIR, not_writable, parse_store_url, sqlite_url

# What MLflow's UI reads (checked in 3.17.2's bundle and in its sources, mlflow/server/js/src/):
# * the experiment tag ``mlflow.experimentKind`` (experiment-tracking/utils/ExperimentKindUtils.ts;
#   values: ExperimentKind in experiment-tracking/constants.ts) marks a model-training experiment;
# * which side of the GenAI / Model training switch a page shows comes from the URL parameter
#   ``workflowType``, else the browser's local storage ``mlflow.workflowType``, whose default is GenAI
#   (common/contexts/WorkflowTypeContext.tsx): in 3.17.2 a fresh browser opens every experiment, even
#   a tagged one, on the empty GenAI overview, so the link names ``workflowType=machine_learning``;
# * the runs table's columns are not URL parameters; a view saved as the experiment tag
#   ``mlflow.sharedViewState.<id>`` (value: the envelope of experiment-page/utils/savedViewEnvelope.ts
#   around the UI state and search facets) is applied by ``?viewStateShareKey=<id>``
#   (experiment-page/hooks/useSharedExperimentViewState.ts) and listed in the page's "Views" menu.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
UI_URL = "http://127.0.0.1:5000"  # where ``mlflow ui`` listens unless told otherwise


def _no_database_error_log(record: logging.LogRecord) -> bool:
    """MLflow logs a database error with its traceback and SQL, then raises it as an
    ``MlflowException`` carrying the same words: the caller reports that (a study: in one line)."""
    return not (record.exc_info and str(record.msg).startswith("SQLAlchemy database error"))


logging.getLogger("mlflow.store.db.utils").addFilter(_no_database_error_log)


TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def default_tracking_uri(runs_dir: Path) -> str:
    """The local store under a runs folder: ``sqlite:///<runs_dir>/mlflow.db`` (absolute)."""
    return sqlite_url(Path(runs_dir) / "mlflow.db")


def resolve_tracking_uri(tracking_uri: str | None, runs_dir: Path = DEFAULT_RUNS_DIR, *,
                         must_exist: bool = False) -> str | None:
    """Which MLflow store, for every command: ``tracking_uri`` if given, else
    ``$MLFLOW_TRACKING_URI``, else the local store under ``runs_dir``
    (:func:`default_tracking_uri`). With ``must_exist`` (a reader: serve, predict, explain),
    that local store counts only if its file exists; otherwise None (no store), and nothing is
    created. A command's ``--tracking-uri`` option reads the same variable, so the option, a
    :class:`Tracker` and the readers all give the same answer."""
    uri = tracking_uri or os.environ.get(TRACKING_URI_ENV) or None
    if uri:
        return uri
    if must_exist and not (Path(runs_dir) / "mlflow.db").is_file():
        return None
    return default_tracking_uri(runs_dir)


_BAD_KEY_CHARS = re.compile(r"[^\w\-. /:]")


def metric_key(name: str) -> str:
    """A metric/param name MLflow accepts (alphanumerics, ``_ - . / : space``):
    ``best_val_auc@25%`` becomes ``best_val_auc_at25pct``."""
    return _BAD_KEY_CHARS.sub("_", name.replace("@", "_at").replace("%", "pct"))


class Tracker:
    """The one way to MLflow: experiments, runs, artifacts and the model registry of one
    store (:func:`resolve_tracking_uri` of ``tracking_uri`` and ``runs_dir``). Its MLflow
    client is its own (``_client``): callers use the methods below.

    ``create=False``: a reader's store (``topocam explain``): a local SQLite store that is not
    there is an error naming it, and nothing is made (no runs folder, database or lock file), so a
    store in a read-only folder can be read. Otherwise a local store must be writable."""

    def __init__(self, tracking_uri: str | None, runs_dir: Path = DEFAULT_RUNS_DIR, create: bool = True):
        # fail within seconds on an unreachable server instead of retrying for minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per fetched model artifact buries the log
        self.runs_dir = Path(runs_dir).resolve()
        tracking_uri = resolve_tracking_uri(tracking_uri, self.runs_dir)
        if create and tracking_uri == default_tracking_uri(self.runs_dir):  # the local store's folder is ours to make
            self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.store = parse_store_url(tracking_uri)
        if self.store.kind == "postgresql":  # the driver installed with the project
            tracking_uri = self.store.url
        self.uri = tracking_uri
        if self.store.kind == "sqlite":
            if not create and not self.store.path.is_file():
                raise TopoCAMError(f"no MLflow store at {self.store.path}; pass --runs-dir or --tracking-uri")
            folder = self.store.path.parent
            if not folder.is_dir():
                raise TopoCAMError(
                    f"cannot open the MLflow tracking store {tracking_uri!r}: folder {folder} does not exist; "
                    "create it or check --tracking-uri"
                )
            why = not_writable(self.store.path) if create else None
            if why is not None:
                raise TopoCAMError(
                    f"cannot write the MLflow tracking store {self.store.path}: {why}; logging runs writes there, so pass a "
                    "writable --tracking-uri or --runs-dir"
                )
        try:
            # the first call creates or migrates a database store, which is not safe between
            # processes ("UNIQUE constraint failed: alembic_version.version_num"): under the store's lock.
            # A reader creates nothing and takes no lock (none in a read-only folder)
            with FileLock(self.store.lock_path if create else None):
                try:
                    self._client = _open_client(tracking_uri)
                except Exception as exc:
                    if not create or self.store.kind != "sqlite" or not _set_aside_half_created(self.store.path, exc):
                        raise
                    _forget_engine(tracking_uri)
                    self._client = _open_client(tracking_uri)
        except TopoCAMError:
            raise
        except Exception as exc:  # mlflow raises many types for a bad URI; all mean "cannot track here"
            msg = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise TopoCAMError(
                f"cannot open the MLflow tracking store {tracking_uri!r} ({msg}); check --tracking-uri "
                f"(e.g. http://host:5000 for a server, or leave it out for the local {self.runs_dir}/mlflow.db)"
            ) from None

    # -- experiments and runs -------------------------------------------------
    @property
    def lock_path(self) -> Path | None:
        """Serialises find-or-create of runs between workers sharing a local store."""
        return self.store.lock_path

    def experiment(self, name: str) -> str:
        exp = self._client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise TopoCAMError(
                    f"MLflow experiment {name!r} in {self.uri} is deleted; restore it (mlflow experiments restore "
                    f"--experiment-id {exp.experiment_id}), purge it (mlflow gc), or rename the study"
                )
            if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # a store written before the tag was set
                self._client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        artifacts = None
        if self.store.kind in ("sqlite", "file"):
            artifacts = (self.runs_dir / "artifacts" / name).as_uri()
        try:
            return self._client.create_experiment(name, artifact_location=artifacts, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created concurrently by another worker: use theirs
            exp = self._client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def find_experiment(self, name: str) -> str | None:
        """The id of an active experiment of this name, or None; nothing is created (a reader's look-up)."""
        exp = self._client.get_experiment_by_name(name)
        return None if exp is None or exp.lifecycle_stage == "deleted" else exp.experiment_id

    def experiment_name(self, experiment_id: str) -> str:
        return self._client.get_experiment(experiment_id).name

    def get_run(self, run_id: str):
        """The run (MLflow's ``Run``: ``info``, ``data.tags``, ``data.params``, ``data.metrics``)."""
        return self._client.get_run(run_id)

    def search_runs(self, experiment_ids: list[str], filter_string: str = "", max_results: int = 1000,
                    order_by: list[str] | None = None) -> list:
        """Active runs of these experiments matching an MLflow search filter."""
        return list(self._client.search_runs(experiment_ids, filter_string=filter_string, max_results=max_results,
                                             order_by=order_by))

    # -- the MLflow UI ---------------------------------------------------------
    def ui_command(self) -> str | None:
        """The command that serves this store's UI at :data:`UI_URL`; None for a tracking server,
        which serves its own UI."""
        return None if self.uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {self.uri}"

    def runs_table_url(
        self, experiment_id: str, *, filter: str = "", metrics: list[str] | tuple[str, ...] = (),
        params: list[str] | tuple[str, ...] = (), tags: list[str] | tuple[str, ...] = (),
        order_by: str | None = None, ascending: bool = False, name: str | None = None, ui_url: str | None = None,
    ) -> str:
        """The link to the experiment's runs table showing the runs that match ``filter`` (MLflow
        search syntax, e.g. ``tags.ablation = 'cam'``) with these metric, parameter and tag
        columns, sorted by the metric ``order_by`` (descending unless ``ascending``).

        The view is saved once as an experiment tag, so the link works in any browser, also one
        that never opened MLflow; the same view asked for again reuses the tag. With a ``name``
        the view is also listed in the page's "Views" menu, which holds 40 views per experiment
        (give one to a few broad views, not to one per sampler and seed); without, only the link
        reaches it. The link's host is the tracking server for an ``http(s)``
        tracking URI, else ``ui_url`` (default :data:`UI_URL`, where the command of
        :meth:`ui_command` serves a local store). Should the view not be saved (say, a server
        that refuses tags), the link still opens the runs table, with MLflow's default columns."""
        base = (ui_url or (self.uri if self.ui_command() is None else UI_URL)).rstrip("/")
        url = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        keys = {f"{kind}.`{k}`": k for kind, names in (("metrics", map(metric_key, metrics)), ("params", map(metric_key, params)),
                                                         ("tags", tags)) for k in names}
        state: dict[str, Any] = {  # the UI's column ids are these keys (makeCanonicalSortKey)
            "searchFilter": filter,
            "selectedColumns": list(keys),
            "columnOrder": list(keys),  # as given, first after the run's name and times
            "columnWidths": {col: max(100, 7 * len(k) + 40) for col, k in keys.items()},  # the whole name in view
        }
        if order_by:
            state.update(orderByKey=f"metrics.`{metric_key(order_by)}`", orderByAsc=bool(ascending))
        blob = json.dumps(state, sort_keys=True)
        view_id = "topocam-" + hashlib.sha256(f"{name}\n{blob}".encode()).hexdigest()[:16]
        key = VIEW_TAG_PREFIX + view_id
        try:
            if key not in self._client.get_experiment(experiment_id).tags:  # a saved view's envelope, or a bare shared state
                value = json.dumps({"name": name[:200], "createdAt": int(time.time() * 1000), "state": blob}) if name else blob
                self._client.set_experiment_tag(experiment_id, key, value)
        except Exception:  # the link without the view is still the right page
            return url
        return f"{url}&viewStateShareKey={view_id}"

    def find_runs(self, experiment_id: str, tags: dict[str, Any], max_results: int = 1000, status: str | None = None) -> list:
        """Active runs carrying all these tags (and this status), newest first."""
        flt = " and ".join(([tags_filter(tags)] if tags else []) + ([f"attributes.status = '{status}'"] if status else []))
        runs = self.search_runs([experiment_id], flt, max_results=max_results, order_by=["attributes.start_time DESC"])
        want = {k: str(v) for k, v in tags.items()}
        return [r for r in runs if all(r.data.tags.get(k) == v for k, v in want.items())]  # LIKE's near misses out

    def find_run(self, experiment_id: str, tags: dict[str, Any]) -> str | None:
        runs = self.find_runs(experiment_id, tags, max_results=1 if all(map(_exact, tags.values())) else 1000)
        return runs[0].info.run_id if runs else None

    def start_run(
        self, experiment_id: str, name: str, tags: dict[str, Any], parent: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> str:
        all_tags = {k: str(v) for k, v in tags.items()}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self._client.create_run(experiment_id, run_name=name, tags=all_tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(metric_key(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items() if v is not None and not math.isnan(float(v))]
        if items:
            self._client.log_batch(run_id, metrics=items)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._client.set_tag(run_id, k, str(v))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._client.set_terminated(run_id, status=status)

    def reopen(self, run_id: str) -> None:
        """Mark a finished run RUNNING again (a sampler resumed with more trials); :meth:`finish` ends it."""
        self._client.update_run(run_id, status="RUNNING")

    # -- artifacts ---------------------------------------------------------------
    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(run_id, str(path), artifact_path)

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        """Upload a folder's files under ``artifact_path`` (the run's artifact store: a server's
        ``mlflow-artifacts:`` proxy, or any artifact URI MLflow supports)."""
        self._client.log_artifacts(run_id, str(folder), artifact_path)

    def artifact_uri(self, run_id: str) -> str:
        return self._client.get_run(run_id).info.artifact_uri

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._client.log_text(run_id, text, artifact_file)

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact (works on a finished run)."""
        self._client.log_figure(run_id, figure, artifact_file)

    def list_artifacts(self, run_id: str, path: str | None = None) -> list:
        return self._client.list_artifacts(run_id, path)

    def download_artifacts(self, run_id: str, path: str, dst_path: str | None = None) -> str:
        """Copy a run's artifact (file or folder) to ``dst_path``; returns its local path."""
        return self._client.download_artifacts(run_id, path, dst_path)

    # -- the model registry ------------------------------------------------------
    def set_model_alias(self, name: str, alias: str, version: int | str) -> None:
        """Point ``models:/NAME@ALIAS`` at this version of a registered model."""
        self._client.set_registered_model_alias(name, alias, str(version))

    def set_model_version_tags(self, name: str, version: int | str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._client.set_model_version_tag(name, str(version), k, str(v))

    def describe_model_version(self, name: str, version: int | str, description: str) -> None:
        self._client.update_model_version(name, str(version), description=description)


def _open_client(uri: str):
    """An MLflow client whose store answered once (creating or migrating a database store)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    client.search_experiments(max_results=1)
    return client


def _forget_engine(uri: str) -> None:
    """MLflow keeps one SQLAlchemy engine per database URI for the life of the process
    (``SqlAlchemyStore._engine_map``, not public): its pooled connections still hold a file that
    was moved aside, so it is disposed of before the new file is opened."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
    if engine is not None:
        engine.dispose()


def _runs_in(path: Path) -> int | None:
    """How many runs an MLflow SQLite file holds (0 without a ``runs`` table); None if SQLite
    cannot read it."""
    import sqlite3

    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return con.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        finally:
            con.close()
    except sqlite3.Error:
        return None


# what SQLite says of a database whose schema is partial (MLflow's create_all and migrations cut short);
# not "out-of-date database schema": a store of an older MLflow, which 'mlflow db upgrade' migrates
_HALF_CREATED = ("already exists", "duplicate column", "no such table", "no such column", "has no column named")
_UNREADABLE = ("file is not a database", "database disk image is malformed")


def _set_aside_half_created(path: Path, exc: Exception) -> bool:
    """Whether a local MLflow database MLflow failed to open (``exc``) was moved aside.

    Creating one runs a few dozen schema migrations; a full disk (or a kill) part-way leaves a
    file on which every later open fails ("duplicate column name: step", "table ... already
    exists"), even once there is space again. When it holds no runs nothing is lost by starting
    afresh: it is moved to ``<name>.broken-<time>`` (with its journal), said in a
    :class:`DamagedStoreWarning`, and True is returned: the caller opens a new one. A file with
    runs, or one SQLite cannot read, is left alone: a TopoCAMError names it and the fix. Any
    other failure (the disk still full, a lock) is not the file's: False."""
    if not path.is_file():
        return False
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(exc).__name__]
    why = next((ln for ln in lines if "(sqlite3." in ln), lines[0])[:200]  # the driver's words, not the SQL
    move = f"move it away (mv {path} {path}.bak) to start a new store"
    if any(w in text for w in _UNREADABLE):
        raise TopoCAMError(f"the MLflow tracking store {path} is damaged ({why}): restore it from a backup, or {move}")
    if not any(w in text for w in _HALF_CREATED):
        return False
    n = _runs_in(path)
    if n is None or n > 0:
        held = "SQLite cannot count its runs" if n is None else f"it holds {n} run{'s' * (n != 1)}"
        raise TopoCAMError(
            f"the MLflow tracking store {path} is half-created or half-upgraded ({why}) and {held}, so it is left as it "
            f"is: back it up, then try 'mlflow db upgrade {sqlite_url(path)}', or {move}"
        )
    aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("-journal", "-wal", "-shm"):  # a hot journal left beside a new file would be replayed into it
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(aside.with_name(aside.name + suffix))
    path.rename(aside)
    warnings.warn(DamagedStoreWarning(
        f"the MLflow tracking store {path} was half-created ({why}) and held no runs: moved it to {aside.name} "
        "and created a new one"), stacklevel=3)
    return True


def _exact(v: Any) -> bool:
    """Whether an MLflow filter can name this value exactly: not when it holds both quote kinds."""
    return not ("'" in str(v) and '"' in str(v))


def _tag_condition(key: str, value: Any) -> str:
    """``tags.key = 'value'``. MLflow's filter parser takes a string literal verbatim between its
    quotes (a backslash escapes nothing: ``'o\\'brien'`` matches nothing), so a value holding a
    single quote is written in double quotes. One holding both kinds cannot be written at all; it
    is matched with LIKE, each quote the one-character wildcard ``_``, which may match a few
    other values too (:meth:`Tracker.find_runs` keeps the exact ones)."""
    v = str(value)
    name = f"tags.{key if _IDENTIFIER.fullmatch(key) else f'`{key}`'}"
    if not _exact(v):
        pattern = v.replace("'", "_").replace('"', "_")
        return f"{name} LIKE '{pattern}'"
    return f'{name} = "{v}"' if "'" in v else f"{name} = '{v}'"


def tags_filter(tags: dict[str, Any]) -> str:
    """An MLflow search filter for runs carrying all these tags: ``tags.arm = 'x' and ...`` (a key
    other than a plain identifier in backquotes), as a person would type it in the UI's search box."""
    return " and ".join(_tag_condition(k, v) for k, v in tags.items())


_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def flat_metrics(prefix: str, metrics: dict[str, float] | None) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in (metrics or {}).items()}


def run_experiment_name(dataset: str) -> str:
    """``topocam run`` results go to one experiment per dataset (studies have their own)."""
    return f"run-{dataset}"


def log_topocam_run(tracker: Tracker, result: dict) -> str:
    """Log a ``topocam run`` result: a parent run (``kind=run``) holding the summary over
    seeds and metrics.json, and one nested run per seed with its metrics, predicted-class
    counts and timings. A degenerate backbone is tagged ``degenerate_backbone=true``, a
    leakage audit ``leakage_audit=true`` (its numbers are not a valid result).
    Returns the experiment name."""
    name = run_experiment_name(result["dataset"]["name"])
    exp = tracker.experiment(name)
    audit = "leakage_audit" in result
    degenerate = result["summary"]["degenerate_backbones"]
    base_tags = {"kind": "run", "dataset": result["dataset"]["name"], "leakage_audit": str(audit).lower()}
    cfg = {k: v for k, v in result["config"].items() if k not in ("seed", "data_dir", "cache_dir")}
    parent = tracker.start_run(
        exp, f"{result['dataset']['name']}-seeds{'_'.join(map(str, result['seeds']))}",
        {**base_tags, "seeds": ",".join(map(str, result["seeds"])), "degenerate_backbone": str(bool(degenerate)).lower()},
        params={**cfg, "seeds": result["seeds"], "data_fingerprint": result["dataset"]["fingerprint"],
                **{f"repro_{k}": v for k, v in result.get("reproducibility", {}).items()}},
    )
    summary = {}
    for method in ("topocam", "cnn", "topo_original"):
        for split, per_metric in result["summary"][method].items():
            for metric, stat in per_metric.items():
                key = f"{method}_{split}_{metric}"
                summary[f"{key}_mean"], summary[f"{key}_sd"] = stat["mean"], stat["sd"]
                if "ci95" in stat:
                    summary[f"{key}_ci95_lo"], summary[f"{key}_ci95_hi"] = stat["ci95"]
    tracker.log_metrics(parent, summary)
    tracker.log_text(parent, json.dumps(json_safe(result), indent=2, allow_nan=False), "metrics.json")
    for r in result["runs"]:
        bb = r["backbone"]
        child = tracker.start_run(
            exp, f"{result['dataset']['name']}-seed{r['seed']}",
            {**base_tags, "seed": r["seed"], "degenerate_backbone": str(bb["degenerate"]).lower(),
             "backbone_selected_by": bb["selected_by"]},
            parent=parent, params={"seed": r["seed"], "backbone_init": bb["init"], "backbone_best_epoch": bb["best_epoch"]},
        )
        metrics = {f"{m}_{s}_{k}": v for m, by_split in r["metrics"].items() for s, d in by_split.items() for k, v in d.items()}
        metrics.update({f"cnn_pred_{s}_class{c}": n for s, counts in bb["predicted_counts"].items() for c, n in enumerate(counts)})
        metrics.update({f"roi_fraction_{s}": v for s, v in r["roi"]["fraction"].items()})
        metrics.update({f"roi_empty_{s}": v for s, v in r["roi"]["empty"].items()})
        metrics.update({f"roi_{k}": v for k, v in (r["roi"]["quality"] or {}).items()})
        metrics.update({f"time_{k}_s": v for k, v in r["timings_s"].items()})
        tracker.log_metrics(child, metrics)
        tracker.finish(child)
    tracker.finish(parent)
    return name
