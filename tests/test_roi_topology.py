import numpy as np
import pytest

from topocam.core.errors import TopoCAMError
from topocam.core.backbone import CAM_LAYERS
from topocam.core.roi import (
    dice, fuse_upsampled, fusion_weights, pointing_game, random_masks_like, roi_masks, upsample_normalised,
)
from topocam.core.roi import segment
from topocam.core.topology import BettiGrid, betti_curves, features_from_filtrations, roi_counts

from .reference import gudhi_betti_curves


def test_fusion_weights_on_simplex_and_validated():
    assert np.allclose(fusion_weights([1, 1, 2]), [0.25, 0.25, 0.5])
    for bad, msg in [([1, -1, 1], "non-negative"), ([0, 0, 0], "all zero"), ([1, 2], "need 3"), ([np.nan, 1, 1], "finite")]:
        with pytest.raises(TopoCAMError, match=msg):
            fusion_weights(bad)


def fuse(maps, w, shape):
    """M as pipeline.roi_for computes it."""
    return fuse_upsampled([upsample_normalised(maps[l], shape) if x else None for l, x in zip(CAM_LAYERS, w)], w)


def test_fuse_upsamples_normalises_and_weights():
    rng = np.random.default_rng(0)
    maps = {"layer2": rng.random((3, 8, 8)), "layer3": rng.random((3, 4, 4)), "layer4": rng.random((3, 2, 2))}
    m = fuse(maps, fusion_weights([1, 1, 1]), (16, 16))
    assert m.shape == (3, 16, 16) and m.min() >= 0 and m.max() <= 1 + 1e-6
    only4 = fuse(maps, fusion_weights([0, 0, 1]), (16, 16))
    assert np.isclose(only4.max(), 1) and np.isclose(only4.min(), 0)
    with pytest.raises(TopoCAMError, match="tau"):
        roi_masks(m, 1.5)
    assert roi_masks(m, 0.0).all()


def test_dice_pointing_and_random_masks():
    truth = np.zeros((2, 6, 6), bool)
    truth[:, 1:3, 1:3] = True
    assert np.allclose(dice(truth, truth), 1.0)
    assert np.allclose(dice(truth, ~truth), 0.0)
    fused = np.zeros((2, 6, 6))
    fused[0, 1, 1] = 1
    fused[1, 5, 5] = 1
    assert pointing_game(fused, truth).tolist() == [True, False]
    r = random_masks_like(truth, np.random.default_rng(0))
    assert (r.reshape(2, -1).sum(1) == truth.reshape(2, -1).sum(1)).all()


def test_betti_grid_is_fitted_on_given_values_only():
    train = np.array([[0.2, 0.5], [0.9, np.inf]])
    g = BettiGrid.fit(train, 4)
    assert np.allclose(g.thresholds, np.linspace(0.2, 0.9, 4))
    assert np.allclose(BettiGrid.fit(np.full((2, 2), np.inf), 3).thresholds, [0, 0.5, 1])
    with pytest.raises(TopoCAMError):
        BettiGrid.fit(train, 1)


def test_known_topology_ring_and_segment_modes():
    img = np.ones((1, 9, 9))
    img[0, 2:7, 2:7] = 0.0  # a dark square ...
    img[0, 4, 4] = 1.0  # ... with a bright centre: at t=0.5 the sublevel set is a ring
    curves = betti_curves(img, np.array([0.5, 1.0]), backend="fast")
    assert curves[0, :, 0].tolist() == [1, 1]  # one component, one hole
    assert curves[0, :, 1].tolist() == [1, 0]  # everything: a filled square
    mask = np.zeros((1, 9, 9), bool)
    mask[0, 2:7, 2:7] = True
    assert np.isinf(segment(img, mask, "exclude")[0, 0, 0]) and segment(img, mask, "zero")[0, 0, 0] == 0


@pytest.mark.parametrize("outside", ["zero", "exclude"])
def test_features_shape_normalisation_and_empty_roi_kept(outside):
    rng = np.random.default_rng(1)
    imgs = rng.random((4, 3, 10, 10))[:, 0]
    masks = rng.random((4, 10, 10)) > 0.4
    masks[2] = False  # an empty ROI
    grid = BettiGrid.fit(segment(imgs, masks, outside), 7)
    f = features_from_filtrations(segment(imgs, masks, outside), roi_counts(masks), grid, backend="fast")
    assert f.shape == (4, 2 * 7 + 1)  # d * N + 1
    assert np.all(f[2] == 0)  # defined: zeros and a count of 0, image kept
    assert f[0, -1] == masks[0].sum()
    raw = gudhi_betti_curves(segment(imgs[:1], masks[:1], outside), grid.thresholds)
    assert np.allclose(f[0, :-1], raw.reshape(-1) / masks[0].sum())
