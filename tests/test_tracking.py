"""Tracker against a real MLflow store (SQLite in a temporary folder): the
experiment kind tag, run nesting, key sanitising, tag filters with awkward
values, and the runs-table link."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest

from topocam.core.errors import TopoCAMError
from topocam.tracking import (
    EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, UI_URL, VIEW_TAG_PREFIX, Tracker, default_tracking_uri, metric_key, tags_filter,
)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    # one store for the module: creating an MLflow SQLite database takes seconds
    return Tracker(None, runs_dir=tmp_path_factory.mktemp("mlruns"))


def test_default_store_is_sqlite_under_the_runs_folder(tracker):
    assert tracker.uri == default_tracking_uri(tracker.runs_dir)
    assert (tracker.runs_dir / "mlflow.db").is_file()


def test_a_new_experiment_is_a_model_training_experiment(tracker):
    exp = tracker.experiment("kind-new")
    assert tracker._client.get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert tracker.experiment("kind-new") == exp  # found, not created twice


def test_an_experiment_created_before_the_tag_gets_it(tracker):
    exp = tracker._client.create_experiment("kind-old")
    assert EXPERIMENT_KIND_TAG not in tracker._client.get_experiment(exp).tags
    assert tracker.experiment("kind-old") == exp
    assert tracker._client.get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_a_deleted_experiment_is_one_sentence_naming_the_way_out(tracker):
    exp = tracker.experiment("kind-deleted")
    tracker._client.delete_experiment(exp)
    with pytest.raises(TopoCAMError, match=rf"'kind-deleted' .* is deleted; restore it .*--experiment-id {exp}"):
        tracker.experiment("kind-deleted")


def test_start_run_nests_under_its_parent_with_string_tags_and_params(tracker):
    exp = tracker.experiment("nesting")
    parent = tracker.start_run(exp, "sampler-de", {"kind": "sampler", "seed": 3})
    child = tracker.start_run(exp, "trial-0", {"kind": "trial", "seed": 3}, parent=parent, params={"tau": 0.5})
    c, p = tracker.get_run(child).data, tracker.get_run(parent).data
    assert c.tags["mlflow.parentRunId"] == parent and "mlflow.parentRunId" not in p.tags
    assert c.tags["seed"] == "3" and c.tags["kind"] == "trial"
    assert c.params == {"tau": "0.5"}
    assert tracker.get_run(child).info.run_name == "trial-0"


def test_keys_are_sanitised_and_missing_metrics_dropped(tracker):
    exp = tracker.experiment("keys")
    rid = tracker.start_run(exp, "r", {"kind": "trial"})
    tracker.log_params(rid, {"best@5%": 1, "mlp (hidden)": (128, 64), "long": "x" * 7000})
    tracker.log_metrics(rid, {"best_val_auc@25%": 0.75, "bad#name": 1.0, "nan": float("nan"), "none": None})
    data = tracker.get_run(rid).data
    assert data.metrics == {"best_val_auc_at25pct": 0.75, "bad_name": 1.0}
    assert set(data.params) == {"best_at5pct", "mlp _hidden_", "long"}
    assert data.params["mlp _hidden_"] == "(128, 64)" and len(data.params["long"]) == 6000
    assert metric_key("a@b%c") == "a_atbpctc" and metric_key("ok_name-1.2/x:y z") == "ok_name-1.2/x:y z"


def test_more_than_one_batch_of_params(tracker):
    """MLflow takes 100 params per batch: the rest must not be lost."""
    exp = tracker.experiment("keys")
    rid = tracker.start_run(exp, "many", {"kind": "trial"}, params={f"p{i}": i for i in range(230)})
    assert len(tracker.get_run(rid).data.params) == 230


# MLflow's filter parser takes a literal verbatim between its quotes: a value with a quote, a
# trailing backslash or both quote kinds used to match nothing (a find-or-create then duplicates)
AWKWARD = ("o'brien", 'say "hi"', "a\\", "C:\\data\\o'k.npz", "both'\"", "both__", "x%_y", "plain", "o")


def test_find_runs_matches_values_with_quotes_and_backslashes_exactly(tracker):
    exp = tracker.experiment("filters")
    runs = {v: tracker.start_run(exp, "r", {"kind": "trial", "study": v}) for v in AWKWARD}
    for value, rid in runs.items():
        assert [r.info.run_id for r in tracker.find_runs(exp, {"kind": "trial", "study": value})] == [rid], value
        assert tracker.find_run(exp, {"study": value}) == rid, value
    assert tracker.find_run(exp, {"study": "absent"}) is None


def test_tags_filter_is_what_a_person_types_in_the_search_box():
    assert tags_filter({"study": "plain", "my.key": 3}) == "tags.study = 'plain' and tags.`my.key` = '3'"
    assert tags_filter({"study": "o'brien"}) == 'tags.study = "o\'brien"'
    assert tags_filter({"study": "both'\""}) == "tags.study LIKE 'both__'"


def test_find_runs_filters_on_status_and_a_key_that_needs_backquotes(tracker):
    exp = tracker.experiment("status")
    done = tracker.start_run(exp, "done", {"kind": "trial", "run.group": "g 1"})
    tracker.finish(done)
    running = tracker.start_run(exp, "running", {"kind": "trial", "run.group": "g 1"})
    assert {r.info.run_id for r in tracker.find_runs(exp, {"run.group": "g 1"})} == {done, running}
    assert [r.info.run_id for r in tracker.find_runs(exp, {"run.group": "g 1"}, status="FINISHED")] == [done]
    assert [r.info.run_id for r in tracker.find_runs(exp, {"run.group": "g 1"}, status="RUNNING")] == [running]


def _view_tags(tracker, exp):
    return {k: v for k, v in tracker._client.get_experiment(exp).tags.items() if k.startswith(VIEW_TAG_PREFIX)}


def test_runs_table_url_is_stable_for_the_same_view_and_saves_it_once(tracker):
    exp = tracker.experiment("views")
    ask = dict(filter="tags.kind = 'trial'", metrics=["val_auc@25%"], tags=["sampler"], order_by="val_auc@25%")
    url = tracker.runs_table_url(exp, **ask)
    assert tracker.runs_table_url(exp, **ask) == url
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == UI_URL and parts.fragment.startswith(f"/experiments/{exp}/runs?")
    query = parse_qs(parts.fragment.split("?", 1)[1])
    assert query["workflowType"] == ["machine_learning"]
    views = _view_tags(tracker, exp)
    assert list(views) == [VIEW_TAG_PREFIX + query["viewStateShareKey"][0]]
    state = json.loads(next(iter(views.values())))
    assert state["searchFilter"] == "tags.kind = 'trial'"
    assert state["selectedColumns"] == ["metrics.`val_auc_at25pct`", "tags.`sampler`"]
    assert state["orderByKey"] == "metrics.`val_auc_at25pct`" and state["orderByAsc"] is False


def test_another_view_gets_another_link_and_a_named_view_an_envelope(tracker):
    exp = tracker.experiment("views2")
    a = tracker.runs_table_url(exp, filter="tags.kind = 'trial'")
    b = tracker.runs_table_url(exp, filter="tags.kind = 'best'")
    named = tracker.runs_table_url(exp, filter="tags.kind = 'trial'", name="all trials")
    assert len({a, b, named}) == 3 and len(_view_tags(tracker, exp)) == 3
    key = VIEW_TAG_PREFIX + parse_qs(urlsplit(named).fragment.split("?", 1)[1])["viewStateShareKey"][0]
    envelope = json.loads(_view_tags(tracker, exp)[key])
    assert envelope["name"] == "all trials" and json.loads(envelope["state"])["searchFilter"] == "tags.kind = 'trial'"


def test_a_missing_store_folder_is_one_sentence(tmp_path):
    with pytest.raises(TopoCAMError, match="folder .* does not exist"):
        Tracker(f"sqlite:///{tmp_path}/absent/mlflow.db")
