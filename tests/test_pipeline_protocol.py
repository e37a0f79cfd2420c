"""The protocol of DESIGN.md section 2, each rule a test that fails when broken."""

import dataclasses

import numpy as np
import torch
import pytest

from topocam.core import pipeline
from topocam.core.backbone import TrainSettings, train_backbone
from topocam.core.data import SPLITS
from topocam.core.pipeline import evaluate, original_features, prepare, roi_quality, topocam_features
from topocam.core.roi import segment


def test_cam_target_is_the_predicted_class_in_every_split(base_config, synth2d, cache_dir):
    # a briefly trained backbone errs often, so "predicted" and "label" differ
    cfg = dataclasses.replace(base_config, epochs=1, seed=5)
    ctx = prepare(cfg, progress=False, data=synth2d)
    disagreements = 0
    for variant in ("gradcam", "gradcampp"):
        for s in SPLITS:
            cams = ctx.cams(variant, s)
            pred = ctx.cnn_probs[s].argmax(1)
            assert np.array_equal(cams.targets, pred), f"{variant} {s}: CAM target is not the predicted class"
            disagreements += int((pred != synth2d.y[s]).sum())
    assert disagreements > 0, "precondition: some predictions must differ from labels for this test to bite"


def test_betti_grid_fitted_on_train_only(ctx2d, base_config, monkeypatch):
    seen = []
    real_fit = pipeline.BettiGrid.fit_chunks

    def fit_chunks(cls, chunks, n):
        chunks = list(chunks)  # the training split, a chunk of images at a time
        seen.append(np.concatenate(chunks))
        return real_fit(chunks, n)

    monkeypatch.setattr(pipeline.BettiGrid, "fit_chunks", classmethod(fit_chunks))
    feats = topocam_features(ctx2d, base_config, report_test=True)
    assert len(seen) == 1
    train_masks = pipeline.roi_for(ctx2d, base_config, "train")[1]
    assert np.array_equal(seen[0], segment(ctx2d.gray("train"), train_masks, base_config.outside))
    # changing val/test intensities leaves the grid alone; changing train moves it
    saved = dict(ctx2d._gray)
    try:
        for s in ("val", "test"):
            ctx2d._gray[s] = ctx2d.gray(s) * 0.25 + 0.7
        assert np.array_equal(topocam_features(ctx2d, base_config, True).grid.thresholds, feats.grid.thresholds)
        ctx2d._gray["train"] = ctx2d.gray("train") * 0.5
        assert not np.array_equal(topocam_features(ctx2d, base_config, True).grid.thresholds, feats.grid.thresholds)
    finally:
        ctx2d._gray.clear()
        ctx2d._gray.update(saved)


@pytest.mark.parametrize("tau", [0.6, 1.0])
def test_no_image_is_dropped_even_with_empty_rois(ctx2d, base_config, tau):
    cfg = dataclasses.replace(base_config, tau=tau)
    feats = topocam_features(ctx2d, cfg, report_test=True)
    for s in SPLITS:
        assert len(feats.x[s]) == len(ctx2d.data.y[s])
    if tau == 1.0:  # only exact maxima survive: many images have a (near-)empty ROI
        masks = pipeline.roi_for(ctx2d, cfg, "train")[1]
        counts = masks.reshape(len(masks), -1).sum(1)
        assert np.array_equal(feats.x["train"][:, -1], counts)
    out = evaluate(ctx2d, cfg, report_test=True)
    assert np.isfinite(out.val["acc"]) and np.isfinite(out.test["acc"])


def test_trials_never_touch_test(ctx2d, base_config):
    clean = evaluate(ctx2d, base_config, report_test=False)
    assert clean.test is None and "test" not in clean.features.x
    saved_x, saved_y = ctx2d.data.x["test"], ctx2d.data.y["test"]
    ctx2d.data.x["test"] = np.full_like(saved_x, np.nan)  # poison: any use would show
    ctx2d.data.y["test"] = np.full_like(saved_y, -1)
    ctx2d._gray.pop("test", None)
    try:
        poisoned = evaluate(ctx2d, base_config, report_test=False)
    finally:
        ctx2d.data.x["test"], ctx2d.data.y["test"] = saved_x, saved_y
        ctx2d._gray.pop("test", None)
    assert poisoned.val == clean.val


def test_backbone_training_never_reads_test(synth2d, cache_dir):
    poisoned = dataclasses.replace(
        synth2d, x={**synth2d.x, "test": np.full_like(synth2d.x["test"], np.nan)}, fingerprint=synth2d.fingerprint + "-p"
    )
    s = TrainSettings(arch="small", epochs=2, batch_size=16, seed=3)
    _, a = train_backbone(synth2d, s, cache_dir=cache_dir / "a", progress=False)
    _, b = train_backbone(poisoned, s, cache_dir=cache_dir / "b", progress=False)
    assert a.history == b.history and a.best_epoch == b.best_epoch


def test_backbone_checkpoint_is_cached(synth2d, cache_dir):
    s = TrainSettings(arch="small", epochs=1, batch_size=16, seed=4)
    _, a = train_backbone(synth2d, s, cache_dir=cache_dir, progress=False)
    _, b = train_backbone(synth2d, s, cache_dir=cache_dir, progress=False)
    assert not a.cached and b.cached and a.cache_key == b.cache_key and a.best_val_auc == b.best_val_auc
    _, c = train_backbone(synth2d, dataclasses.replace(s, seed=5), cache_dir=cache_dir, progress=False)
    assert c.cache_key != a.cache_key


def test_cam_cache_reused_and_memory_mapped(ctx2d):
    first = ctx2d.cams("gradcam", "val")
    assert ctx2d.store.has("gradcam")
    again = ctx2d.cams("gradcam", "val")
    assert isinstance(again.maps["layer2"], np.memmap)
    assert np.array_equal(np.asarray(first.maps["layer4"]), np.asarray(again.maps["layer4"]))
    assert again.maps["layer2"].shape[1:] == (10, 10)  # native resolution, not the input grid


def test_seeded_runs_are_reproducible(ctx2d, base_config):
    a = evaluate(ctx2d, base_config, report_test=True)
    b = evaluate(ctx2d, base_config, report_test=True)
    assert a.val == b.val and a.test == b.test


def test_topo_original_uses_whole_image(ctx2d, base_config):
    f = original_features(ctx2d, base_config, report_test=True)
    assert np.all(f.x["train"][:, -1] == np.prod(ctx2d.data.shape))
    assert all(v == 1.0 for v in f.roi_fraction.values())


@pytest.mark.parametrize("cam, dice_ratio, pointing_ratio", [("gradcampp", 3.0, 4.0), ("scorecam", 3.0, 4.0), ("gradcam", 1.5, 2.0)])
def test_roi_finds_the_lesion_far_better_than_chance(ctx2d, base_config, cam, dice_ratio, pointing_ratio):
    """Synthetic lesions with known masks: the layer2 ROI of a trained backbone
    against a random mask of the same size (Dice) and chance (pointing game)."""
    assert ctx2d.backbone.best_val_auc > 0.85, "precondition: the backbone must have learnt the task"
    q = roi_quality(ctx2d, dataclasses.replace(base_config, cam=cam, weights=(1.0, 0.0, 0.0), tau=0.6))
    assert q["dice"] > dice_ratio * q["dice_random_same_size"], q
    assert q["pointing_game"] > pointing_ratio * q["pointing_game_random"], q


def test_validation_is_used_once_the_mlp_never_sees_it(ctx2d, base_config):
    """DESIGN.md §2.8: the MLP's early stopping uses an inner split of train, so the
    fitted classifier (and any K-fold objective) does not change when validation does."""
    from topocam.core.pipeline import cv_score, fit_and_score, topocam_features

    feats = topocam_features(ctx2d, base_config)
    a = fit_and_score(ctx2d, base_config, feats, report_test=False)
    shuffled = dataclasses.replace(feats, x={**feats.x, "val": feats.x["val"][::-1] * 3.0 + 1.0})
    saved = ctx2d.data.y["val"]
    ctx2d.data.y["val"] = 1 - saved  # flipped labels: early stopping on val would move
    try:
        b = fit_and_score(ctx2d, base_config, shuffled, report_test=False)
        cv_b = cv_score(ctx2d, base_config, shuffled)
    finally:
        ctx2d.data.y["val"] = saved
    for (k, va), vb in zip(a.model.net.state_dict().items(), b.model.net.state_dict().values()):
        assert torch.equal(va, vb), k
    assert cv_score(ctx2d, base_config, feats) == cv_b


def test_inner_split_is_stratified_seeded_and_disjoint():
    from topocam.core.classifier import inner_split
    from topocam.core.errors import TopoCAMError

    y = np.array([0] * 30 + [1] * 10)
    fit, stop = inner_split(y, seed=3)
    assert len(stop) == 8 and np.bincount(y[stop]).tolist() == [6, 2]
    assert not set(fit) & set(stop) and len(fit) + len(stop) == 40
    assert np.array_equal(stop, inner_split(y, seed=3)[1]) and not np.array_equal(stop, inner_split(y, seed=4)[1])
    with pytest.raises(TopoCAMError, match="too small to hold out an early-stopping split"):
        inner_split(np.array([0, 0, 0, 1]), seed=0)
