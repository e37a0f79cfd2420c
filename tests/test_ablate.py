"""`topocam ablate`: suites as data, arms over seeds against the reference, the
leakage audit marked invalid, not-run arms listed, MLflow runs tagged; and the core
options the arms use (relative tau, per-image Betti bins, the hybrid head)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from topocam.cli import app
from topocam.core.errors import TopoCAMError
from topocam.core.pipeline import evaluate, predict_images
from topocam.core.roi import roi_masks
from topocam.search.ablate import load_suite
from topocam.core.stats import seed_mean_difference_ci
from topocam.core.topology import BettiGrid, betti_curves, features_per_image_grid

from .test_study import write_study

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------ suite files


def _suite(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "s.toml"
    p.write_text('[suite]\nname = "s"\n' + body)
    return p


def test_shipped_paper_suite_has_the_papers_arms():
    suite = load_suite(REPO / "studies" / "ablations" / "paper.toml")
    keys = {a.key for a in suite.arms}
    assert {f"tau={t}" for t in ("0.4", "0.5", "0.6", "0.7", "0.8")} <= keys
    assert {"layers=layer2", "layers=layer3", "layers=layer4", "cam=gradcam", "cam=gradcampp", "cam=scorecam",
            "init=pretrained", "init=scratch", "outside=zero", "outside=exclude", "baselines=cnn",
            "baselines=topo_original", "beyond=hybrid_head", "beyond=relative_tau"} <= keys
    leaks = [a for a in suite.arms if a.leakage]
    assert {a.name for a in leaks} == {"cam_true_label", "betti_bins_per_image", "mlp_scored_on_its_stopping_split"}
    assert {"roi=threshold", "roi=prompted_rw", "roi=segmenter_dice", "roi=segmenter_dice_topo"} <= keys
    roi = load_suite(REPO / "studies" / "ablations" / "roi.toml")
    assert [a.settings for a in roi.arms][3:] == [{"roi": "prompted", "prompter": "rw"},
                                                  {"roi": "segmenter", "segmenter_loss": "dice"},
                                                  {"roi": "segmenter", "segmenter_loss": "dice+topo"}]


@pytest.mark.parametrize("body, needle", [
    ('[[ablation]]\nname = "a"\narms = [{ arm = "x", cam_target = "label" }]\n', "only an ablation with leakage_audit"),
    ('[[ablation]]\nname = "a"\nleakage_audit = true\narms = [{ arm = "x", tau = 0.5 }]\n', "takes no shortcut"),
    ('[[ablation]]\nname = "a"\narms = [{ arm = "x", colour = 1 }]\n', "arm 'x': unknown setting 'colour'"),
    ('[[ablation]]\nname = "a"\narms = [{ arm = "x", tau = 2.0 }]\n', "arm 'x': tau must be in [0, 1]"),
    ('[[ablation]]\nname = "a"\narms = [{ arm = "x", tau = 0.5 }, { arm = "x", tau = 0.6 }]\n', "declared twice"),
    ('[[ablation]]\nname = "a"\narms = [{ arm = "x", report = "test2" }]\n', "report must be one of"),
])
def test_suite_errors_name_the_ablation_and_arm(tmp_path, body, needle):
    with pytest.raises(TopoCAMError) as exc:
        load_suite(_suite(tmp_path, body))
    assert needle in str(exc.value) and "s.toml" in str(exc.value)


# ------------------------------------------------------------ core options


def test_relative_tau_fills_a_map_that_never_reaches_an_absolute_tau():
    rng = np.random.default_rng(0)
    fused = rng.random((5, 8, 8)).astype(np.float32) * 0.5  # a dead layer caps the fused map at 0.5
    fused[4] = 0.0  # an all-zero map stays empty
    assert not roi_masks(fused, 0.6).any()
    rel = roi_masks(fused, 0.6, "relative")
    peak = fused.reshape(5, -1).max(axis=1)
    for i in range(4):
        assert rel[i].any() and np.array_equal(rel[i], fused[i] / peak[i] >= 0.6)
    assert not rel[4].any()
    with pytest.raises(TopoCAMError, match="tau_mode must be one of absolute, relative"):
        roi_masks(fused, 0.6, "percent")


def test_per_image_betti_grid_bins_each_image_on_its_own_range():
    rng = np.random.default_rng(1)
    f = rng.random((3, 10, 10))
    f[1] *= 10.0  # a different range: a shared grid and a per-image grid disagree on it
    counts = np.full(3, 100)
    feats = features_per_image_grid(f, counts, 6)
    for i in range(3):
        own = BettiGrid(np.linspace(f[i].min(), f[i].max(), 6))
        want = betti_curves(f[i : i + 1], own.thresholds).reshape(-1) / 100.0
        np.testing.assert_allclose(feats[i, :-1], want, rtol=1e-6)
    shared = BettiGrid.fit(f, 6)
    assert not np.allclose(feats[0, :-1], betti_curves(f[:1], shared.thresholds).reshape(-1) / 100.0)


def test_paired_difference_interval():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 30)
    p = rng.random((60, 1))
    probs = np.hstack([1 - p, p])
    same = seed_mean_difference_ci(y, [probs], y, [probs], "binary-class", "auc", paired=True)
    assert same == [0.0, 0.0]  # paired: the same images cancel exactly
    unpaired = seed_mean_difference_ci(y, [probs], y, [probs], "binary-class", "auc", paired=False)
    assert unpaired[0] < -0.02 and unpaired[1] > 0.02  # independent resamples do not cancel
    better = np.hstack([1 - (p + y[:, None]) / 2, (p + y[:, None]) / 2])  # perfectly separating
    lo, hi = seed_mean_difference_ci(y, [better], y, [probs], "binary-class", "auc", paired=True)
    assert lo > 0


@pytest.mark.parametrize("changes", [{"head": "hybrid"}, {"tau_mode": "relative"}])
def test_new_options_predict_new_images_as_evaluate_scored_them(ctx2d, base_config, changes):
    cfg = replace(base_config, **changes)
    out = evaluate(ctx2d, cfg, report_test=True)
    if changes.get("head") == "hybrid":
        n_betti = len(ctx2d.data.shape) * cfg.bins + 1
        emb = ctx2d.embedding("train")
        assert emb.shape == (len(ctx2d.data.y["train"]), 128)  # the small CNN's pooled width
        assert out.features.x["train"].shape[1] == n_betti + 128
        np.testing.assert_array_equal(out.features.x["train"][:, n_betti:], emb)
    pred = predict_images(ctx2d.model, cfg, out.features.grid, out.model, ctx2d.data.x["test"])
    np.testing.assert_allclose(pred.probs, out.probs["test"], atol=1e-5)


def test_leakage_configuration_cannot_predict(ctx2d, base_config):
    cfg = replace(base_config, betti_grid="per_image")
    out = evaluate(ctx2d, cfg, report_test=True)
    with pytest.raises(TopoCAMError, match="leakage-audit"):
        predict_images(ctx2d.model, cfg, out.features.grid, out.model, ctx2d.data.x["test"])


# ------------------------------------------------------------ the command


def test_ablate_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPOCAM_CACHE_DIR", str(tmp_path / "cache"))
    study = write_study(tmp_path, "tinyab", study={"replicate_seeds": [0, 1]})
    suite = _suite(tmp_path, """
[[ablation]]
name = "tau"
arms = [{ arm = "0.4", tau = 0.4 }, { arm = "0.8", tau = 0.8 }]
[[ablation]]
name = "baselines"
arms = [{ arm = "cnn", method = "cnn" }]
[[ablation]]
name = "init"
arms = [{ arm = "pretrained", init = "pretrained" }]
[[ablation]]
name = "leakage"
leakage_audit = true
arms = [{ arm = "label", cam_target = "label" }, { arm = "stop_on_val", mlp_stop = "val", report = "val" }]
""")
    runs = tmp_path / "runs"
    cli = CliRunner()
    # no study in the storage: --base best says what to do, and nothing is written
    res = cli.invoke(app, ["ablate", str(study), "--suite", str(suite), "--runs-dir", str(runs), "--quiet"])
    assert res.exit_code != 0 and f"no study storage at {runs.resolve() / 'optuna.db'}; run a study first" in res.output
    assert not runs.exists()  # a look-up: no optuna.db or mlflow.db made
    res = cli.invoke(app, ["ablate", str(study), "--suite", str(suite), "--base", "file", "--skip", "tau=0.8",
                           "--runs-dir", str(runs), "--quiet", "--no-figures"])
    assert res.exit_code == 0, res.output
    out = json.loads((runs / "ablate" / "tinyab-s" / "ablation.json").read_text())
    rows = {(r["ablation"], r["arm"]): r for r in out["rows"]}
    assert set(rows) == {("reference", "topocam"), ("tau", "0.4"), ("tau", "0.8"), ("baselines", "cnn"),
                         ("init", "pretrained"), ("leakage", "label"), ("leakage", "stop_on_val")}
    assert rows[("tau", "0.8")]["status"] == "not run" and "--skip" in rows[("tau", "0.8")]["reason"]
    assert rows[("init", "pretrained")]["status"] == "not run" and "no pretrained weights" in rows[("init", "pretrained")]["reason"]
    assert not rows[("leakage", "label")]["valid"] and rows[("tau", "0.4")]["valid"]
    assert rows[("reference", "topocam")]["delta_auc"]["mean"] == 0.0

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tinyab-ablate")
    children = client.search_runs([exp.experiment_id], "tags.kind = 'ablation_arm'", max_results=100)
    by = {}
    for r in children:
        by.setdefault((r.data.tags["ablation"], r.data.tags["arm"]), []).append(r)
    assert sorted(len(v) for k, v in by.items() if rows[k]["status"] == "ok") == [2] * 5  # each seed a run
    assert len(by[("tau", "0.8")]) == 1 and by[("tau", "0.8")][0].data.tags["status"] == "not run"
    parent = client.search_runs([exp.experiment_id], "tags.kind = 'ablation'")[0]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert {r.data.tags["valid"] for r in by[("leakage", "label")]} == {"false"}
    # the table's numbers are the runs' numbers: mean of the seeds' test AUC, and the paired difference
    cnn = {int(r.data.tags["seed"]): r.data.metrics["test_auc"] for r in by[("baselines", "cnn")]}
    ref = {int(r.data.tags["seed"]): r.data.metrics["test_auc"] for r in by[("reference", "topocam")]}
    assert rows[("baselines", "cnn")]["auc"]["mean"] == pytest.approx(np.mean(list(cnn.values())))
    assert rows[("baselines", "cnn")]["delta_auc"]["mean"] == pytest.approx(np.mean([cnn[s] - ref[s] for s in (0, 1)]))
    # the validation-reported shortcut stands for its validation number
    val = [r.data.metrics["val_auc"] for r in by[("leakage", "stop_on_val")]]
    assert rows[("leakage", "stop_on_val")]["auc"]["mean"] == pytest.approx(np.mean(val))
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"ablation.md", "ablation.csv", "ablation.json"}
    assert "INVALID (leakage audit)" in (runs / "ablate" / "tinyab-s" / "ablation.md").read_text()


def test_ablate_best_uses_the_studys_best_trial(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPOCAM_CACHE_DIR", str(tmp_path / "cache"))
    study = write_study(tmp_path, "tinybest", study={"samplers": ["random"], "seeds": [0], "n_trials": 3})
    runs = tmp_path / "runs"
    cli = CliRunner()
    res = cli.invoke(app, ["study", "run", str(study), "--sampler", "random", "--seed", "0", "--runs-dir", str(runs), "--quiet"])
    assert res.exit_code == 0, res.output
    suite = _suite(tmp_path, '[[ablation]]\nname = "tau"\narms = [{ arm = "0.5", tau = 0.5 }]\n')
    res = cli.invoke(app, ["ablate", str(study), "--suite", str(suite), "--seeds", "0", "--runs-dir", str(runs), "--quiet"])
    assert res.exit_code == 0, res.output
    out = json.loads((runs / "ablate" / "tinybest-s" / "ablation.json").read_text())
    import optuna

    best = optuna.load_study(study_name="tinybest.random.s0", storage=f"sqlite:///{runs / 'optuna.db'}").best_trial
    ref = out["reference"]["config"]
    assert ref["mlp"] == [best.params["mlp_h1"], best.params["mlp_h2"]] and ref["cam"] == best.params["cam"]
    assert f"trial {best.number}" in out["reference"]["source"]
    # each arm's figures sit in its best seed's run, and `topocam explain` reads the arm's configuration back
    from topocam.report.explain import logged_config

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tinybest-ablate")
    arm = client.search_runs([exp.experiment_id], "tags.ablation = 'tau' and tags.arm = '0.5'")[0]
    assert {"figures/betti_curves.png", "figures/roc.png"} <= {a.path for a in client.list_artifacts(arm.info.run_id, "figures")}
    cfg = logged_config(client, arm.info.run_id).config
    assert cfg.tau == 0.5 and cfg.mlp == tuple(ref["mlp"]) and cfg.seed == 0
