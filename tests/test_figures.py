"""Figures that explain a configuration (topocam.tracking.figures) and `topocam explain`.

One tiny context (synthetic 2D lesions, 16 px, a 2-epoch small CNN, 6 Betti
bins) is shared by the module; every figure is checked against the numbers it
was drawn from (percentiles, AUC, counts, Dice), not only for existing.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from typer.testing import CliRunner

BINS = 6
N = (40, 16, 16)
EXPECTED = {"betti_curves", "tsne", "cam_overlays", "roc", "confusion", "roi_quality"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("figures-cache")


@pytest.fixture(scope="module")
def tiny(cache):
    from topocam.tracking import figures
    from topocam.core.data import make_synthetic
    from topocam.core.pipeline import TopoCAMConfig, prepare

    ds = make_synthetic(2, size=16, n=N, seed=0)
    cfg = TopoCAMConfig(dataset="synthetic2d", size=16, synthetic_n=N, backbone="small", epochs=2, batch_size=16, seed=0,
                        bins=BINS, mlp=(16, 8), n_jobs=1, cache_dir=str(cache), tau=0.5)
    ctx = prepare(cfg, progress=False, data=ds)
    figs = figures.explain(ctx, cfg, report_test=True, variants=("gradcam", "gradcampp"), taus=(0.3, 0.5, 0.7))
    return ctx, cfg, figs


def _by_gid(ax) -> dict:
    return {ln.get_gid(): ln for ln in ax.get_lines() if ln.get_gid()}


def test_explain_draws_every_figure(tiny):
    _, _, figs = tiny
    assert set(figs) == EXPECTED
    assert all(isinstance(f, Figure) for f in figs.values())
    assert set(figs.metrics) == {"val", "test", "cnn_test"}


def test_betti_curves_panels_and_bands_are_the_percentiles(tiny):
    from topocam.core.pipeline import original_features, topocam_features

    ctx, cfg, figs = tiny
    roi = topocam_features(ctx, cfg, report_test=True)
    whole = original_features(ctx, cfg, report_test=True)
    y = ctx.data.y["train"]
    axes = {ax.get_title(): ax for ax in figs["betti_curves"].axes}
    assert set(axes) == {"β0, ROI", "β1, ROI", "β0, whole image", "β1, whole image"}  # 2D: beta_0, beta_1
    for where, feats in (("ROI", roi), ("whole image", whole)):
        curves = feats.x["train"][:, :-1].reshape(len(y), 2, BINS)  # topology layout: beta_0 bins, beta_1 bins, count
        for dim in (0, 1):
            lines = _by_gid(axes[f"β{dim}, {where}"])
            for c in (0, 1):
                cls = curves[y == c, dim]
                for gid, q in ((f"median:{c}", 50), (f"p30:{c}", 30), (f"p70:{c}", 70)):
                    np.testing.assert_allclose(lines[gid].get_ydata(), np.percentile(cls, q, axis=0))
                    np.testing.assert_allclose(lines[gid].get_xdata(), feats.grid.thresholds)


def test_tsne_shows_the_training_features_by_class(tiny):
    from topocam.tracking.figures import tsne_embedding
    from topocam.core.pipeline import topocam_features

    ctx, cfg, figs = tiny
    y = ctx.data.y["train"]
    roi_ax, whole_ax = figs["tsne"].axes
    assert "ROI" in roi_ax.get_title() and "whole image" in whole_ax.get_title()
    for ax, panel in ((roi_ax, "ROI"), (whole_ax, "whole")):
        pts = {c.get_gid(): c.get_offsets() for c in ax.collections}
        assert {k: len(v) for k, v in pts.items()} == {f"tsne:{panel}:{c}": int((y == c).sum()) for c in (0, 1)}
    emb = tsne_embedding(topocam_features(ctx, cfg).x["train"], seed=0)  # fixed random_state: the same picture
    drawn = {c.get_gid(): np.asarray(c.get_offsets()) for c in roi_ax.collections}
    for c in (0, 1):
        np.testing.assert_allclose(drawn[f"tsne:ROI:{c}"], emb[y == c], rtol=1e-5, atol=1e-5)


def test_roc_auc_in_the_legend_is_sklearns_and_confusion_counts_sum_to_the_test_size(tiny):
    from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

    from topocam.core.metrics import predicted_labels
    from topocam.core.pipeline import evaluate

    ctx, cfg, figs = tiny
    y = ctx.data.y["test"]
    probs = evaluate(ctx, cfg, report_test=True).probs["test"]  # what the run reports
    auc = roc_auc_score(y, probs[:, 1])
    ax = figs["roc"].axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"TopoCAM (AUC = {auc:.3f})" in legend
    assert f"CNN (backbone) (AUC = {roc_auc_score(y, ctx.cnn_probs['test'][:, 1]):.3f})" in legend
    assert any(t.startswith("Topo-Original (AUC = ") for t in legend)
    assert figs.metrics["test"]["auc"] == pytest.approx(auc)
    fpr, tpr, _ = roc_curve(y, probs[:, 1])
    line = _by_gid(ax)["roc:TopoCAM"]
    np.testing.assert_allclose(line.get_xdata(), fpr)
    np.testing.assert_allclose(line.get_ydata(), tpr)

    cm_ax = figs["confusion"].axes[0]
    counts = [int(t.get_text()) for t in cm_ax.texts if t.get_gid() == "count"]
    assert sum(counts) == len(y) == N[2]
    expected = confusion_matrix(y, predicted_labels(probs, ctx.data.task), labels=[0, 1])
    np.testing.assert_array_equal(cm_ax.images[0].get_array(), expected)


def test_cam_overlays_show_images_of_each_class(tiny):
    ctx, _, figs = tiny
    axes = [ax for ax in figs["cam_overlays"].axes if ax.get_title()]
    assert len(axes) == 2 * 3  # 2 classes x 3 images
    names = ctx.data.class_names
    for ax in axes:
        assert len(ax.images) == 2  # the image and the heat map over it
        assert "true: " in ax.get_title() and "pred: " in ax.get_title()
    assert sum(f"true: {names[0]}" in ax.get_title() for ax in axes) == 3


def test_roi_quality_matches_the_pipelines_own_measure(tiny):
    from topocam.core.pipeline import roi_quality

    ctx, cfg, figs = tiny
    rows = figs.tables["roi_quality"]
    assert [(r["cam"], r["tau"]) for r in rows] == [(v, t) for v in ("gradcam", "gradcampp") for t in (0.3, 0.5, 0.7)]
    mine = next(r for r in rows if r["cam"] == cfg.cam and r["tau"] == cfg.tau)
    ref = roi_quality(ctx, cfg, "test")
    for k in ("dice", "iou", "pointing_game", "betti_error", "roi_fraction", "dice_random_same_size"):
        assert mine[k] == pytest.approx(ref[k]), k
    assert mine["pointing_game_chance"] == pytest.approx(ref["pointing_game_random"])
    assert all(0 <= r["iou"] <= r["dice"] <= 1 for r in rows)  # IoU <= Dice, always
    dice_ax = figs["roi_quality"].axes[0]
    lines = _by_gid(dice_ax)
    np.testing.assert_allclose(lines["dice:gradcampp"].get_ydata(), [r["dice"] for r in rows if r["cam"] == "gradcampp"])
    betti = _by_gid(figs["roi_quality"].axes[2])
    np.testing.assert_allclose(betti["betti:gradcam"].get_ydata(), [r["betti_error"] for r in rows if r["cam"] == "gradcam"])


def test_roi_quality_of_another_generator_is_its_own_row_and_line(tiny):
    """roi=prompted: the figure's table has the threshold rows and one row of the prompted ROI
    (tau None), equal to the pipeline's measure of that configuration, drawn as a line."""
    from dataclasses import replace

    from topocam.core.pipeline import roi_quality
    from topocam.tracking.figures import explain

    ctx, cfg, _ = tiny
    pcfg = replace(cfg, roi="prompted")
    figs = explain(ctx, pcfg, variants=(cfg.cam,))
    rows = figs.tables["roi_quality"]
    mine = [r for r in rows if r["tau"] is None]
    assert [r["generator"] for r in mine] == ["prompted (rw)"] and all(r["generator"] == "threshold" for r in rows[:-1])
    ref = roi_quality(ctx, pcfg, "test")
    for k in ("dice", "iou", "pointing_game", "betti_error"):
        assert mine[0][k] == pytest.approx(ref[k]), k
    assert _by_gid(figs["roi_quality"].axes[0])["dice:prompted (rw)"].get_ydata()[0] == pytest.approx(ref["dice"])


def test_a_trial_never_touches_the_test_split(tiny, monkeypatch):
    """report_test=False (a study trial): every figure from train and validation only."""
    import topocam.core.pipeline as pipeline
    from topocam.tracking import figures

    ctx, cfg, _ = tiny
    seen: list[str] = []
    real_roi_for, real_gray = pipeline.roi_for, type(ctx).gray
    monkeypatch.setattr(pipeline, "roi_for", lambda c, k, split, *a: seen.append(split) or real_roi_for(c, k, split, *a))
    monkeypatch.setattr(type(ctx), "gray", lambda self, split, *a: seen.append(split) or real_gray(self, split, *a))
    figs = figures.explain(ctx, cfg, report_test=False, variants=("gradcam",), taus=(0.5,))
    assert set(figs) == EXPECTED and "test" not in figs.metrics
    assert seen and "test" not in seen
    counts = [int(t.get_text()) for t in figs["confusion"].axes[0].texts if t.get_gid() == "count"]
    assert sum(counts) == N[1]
    assert "val split" in figs["roc"].axes[0].get_title()


def test_3d_overlay_is_a_montage_of_middle_slices():
    from topocam.tracking.figures import cam_overlay_figure, middle_slices

    rng = np.random.default_rng(0)
    vol = rng.random((4, 12, 10, 10)).astype(np.float32)
    fig = cam_overlay_figure(vol, vol, vol > 0.5, np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]),
                             class_names=["a", "b"], per_class=2, n_slices=3)
    zs = middle_slices(12, 3)
    assert zs == [3, 6, 9] and middle_slices(28, 3) == [7, 14, 21] and middle_slices(2, 3) == [0, 1] and len(fig.axes) == 4 * 3
    assert [ax.get_title() for ax in fig.axes[:3]] == [f"slice {z}" for z in zs]
    assert [ax.get_ylabel().split("\n") for ax in fig.axes[::3]][1] == ["#1", "true: a", "pred: b"]


def test_betti_blocks_refuses_a_wrong_layout():
    from topocam.tracking.figures import betti_blocks

    assert betti_blocks(np.zeros((3, 2 * 5 + 1)), 5).shape == (3, 2, 5)
    with pytest.raises(ValueError):
        betti_blocks(np.zeros((3, 2 * 5)), 5)


# ------------------------------------------------------------------ the command

runner = CliRunner()
FAST = ["--dataset", "synthetic2d", "--size", "16", "--synthetic-n", "40,16,16", "--backbone", "small", "--epochs", "2",
        "--batch-size", "16", "--bins", "8", "--mlp", "16,8", "--n-jobs", "1", "--quiet"]


def _client(runs):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")


def test_explain_a_topocam_run_writes_and_logs_the_pngs(tmp_path, cache):
    from topocam.cli import app

    runs = tmp_path / "mlruns"
    r = runner.invoke(app, ["run", *FAST, "--out", str(tmp_path / "out"), "--cache-dir", str(cache), "--runs-dir", str(runs)])
    assert r.exit_code == 0, r.output
    client = _client(runs)
    seed_run = next(x for x in client.search_runs([e.experiment_id for e in client.search_experiments()])
                    if "mlflow.parentRunId" in x.data.tags)
    run_id = seed_run.info.run_id
    out = tmp_path / "figs"
    r = runner.invoke(app, ["explain", run_id, "--runs-dir", str(runs), "--cache-dir", str(cache), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    pngs = {f"{n}.png" for n in EXPECTED}
    assert {p.name for p in out.iterdir()} == pngs | {"roi_quality.csv"}
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    logged = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert logged == {f"figures/{p}" for p in pngs} | {"figures/roi_quality.csv"}
    # the figures are of the logged configuration: the re-computed metrics equal the logged ones
    assert "differs from the logged run" not in r.output
    assert f"re-computed TopoCAM, test: AUC {seed_run.data.metrics['topocam_test_auc']:.3f}" in r.output
    assert "ROI vs true lesion, gradcam at tau 0.60" in r.output


def test_explain_a_study_trial_uses_validation_and_best_uses_test(tmp_path, cache, monkeypatch):
    from topocam.cli import app

    monkeypatch.setenv("TOPOCAM_CACHE_DIR", str(cache))
    study = tmp_path / "tiny.toml"
    study.write_text(
        '[study]\nname = "figtiny"\nn_trials = 2\nsamplers = ["random"]\nseeds = [0]\n'
        '[data]\ndataset = "synthetic2d"\nsize = 16\nsynthetic_n = [40, 16, 16]\n'
        '[backbone]\nbackbone = "small"\nepochs = 2\nbatch_size = 16\nseed = 0\n'
        '[fixed]\nbins = 8\nn_jobs = 1\n[space.cam]\nfixed = "gradcam"\n'
    )
    runs = tmp_path / "runs"
    r = runner.invoke(app, ["study", "run", str(study), "--runs-dir", str(runs), "--quiet"])
    assert r.exit_code == 0, r.output
    client = _client(runs)
    exp = client.get_experiment_by_name("figtiny").experiment_id
    by_kind = {}
    for x in client.search_runs([exp]):
        by_kind.setdefault(x.data.tags["kind"], []).append(x)
    best = by_kind["best"][0]
    trial = next(x for x in by_kind["trial"] if x.data.tags["trial"] == best.data.tags["trial"])
    r = runner.invoke(app, ["explain", trial.info.run_id, "--runs-dir", str(runs), "--out", str(tmp_path / "t"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "validation (a trial: test is not touched)" in r.output and "test: AUC" not in r.output
    assert f"re-computed TopoCAM, val: AUC {trial.data.metrics['val_auc']:.3f}" in r.output
    assert "differs from the logged run" not in r.output
    assert len(client.list_artifacts(trial.info.run_id, "figures")) == len(EXPECTED) + 1
    r = runner.invoke(app, ["explain", best.info.run_id, "--runs-dir", str(runs), "--out", str(tmp_path / "b"), "--quiet",
                            "--no-log"])
    assert r.exit_code == 0, r.output
    assert f"re-computed TopoCAM, test: AUC {best.data.metrics['test_auc']:.3f}" in r.output
    assert "differs from the logged run" not in r.output
    assert client.list_artifacts(best.info.run_id, "figures") == []  # --no-log
    r = runner.invoke(app, ["explain", by_kind["baseline"][0].info.run_id, "--runs-dir", str(runs), "--quiet"])
    assert r.exit_code == 2 and "kind=baseline" in r.output


def test_explain_an_unknown_run_is_one_line(tmp_path):
    from topocam.cli import app

    from topocam.tracking import Tracker

    r = runner.invoke(app, ["explain", "0123abcd", "--runs-dir", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no MLflow store" in r.output
    Tracker(None, tmp_path / "runs")  # an empty store
    r = runner.invoke(app, ["explain", "0123abcd", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "no MLflow run '0123abcd'" in r.output and len(r.output.strip().splitlines()) == 1


def test_multiclass_roc_legend_is_the_macro_one_vs_rest_auc():
    from sklearn.metrics import roc_auc_score

    from topocam.tracking.figures import confusion_figure, roc_figure
    from topocam.core.metrics import evaluate

    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 10)
    p = rng.dirichlet([1, 1, 1], size=30) + np.eye(3)[y] * 0.5
    p /= p.sum(axis=1, keepdims=True)
    ax = roc_figure(y, {"m": p}, "multi-class").axes[0]
    auc = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert auc == pytest.approx(evaluate(y, p, "multi-class")["auc"])  # MedMNIST's definition
    assert f"m (AUC = {auc:.3f})" in [t.get_text() for t in ax.get_legend().get_texts()]
    fig = confusion_figure(y, p.argmax(axis=1), 3, class_names=["a", "b", "c"])
    assert sum(int(t.get_text()) for t in fig.axes[0].texts if t.get_gid() == "count") == 30
