"""The `segmenter` ROI generator: its topology loss (gradients, descent to a target
topology), the U-Net baseline against chance, its cache, and its refusals."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
import warnings

import numpy as np
import pytest
import torch

from topocam.core.errors import CorruptCacheWarning, TopoCAMError
from topocam.core.roi import dice, random_masks_like
from topocam.core.segmenter import (
    SegmenterSettings,
    betti_numbers,
    betti_numbers_batch,
    persistence_cells,
    topo_loss,
    train_segmenter,
)


def _grid(shape):
    return np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")


def _ball(shape, centre, r2):
    return sum((g - c) ** 2 for g, c in zip(_grid(shape), centre)) <= r2


def _soft(mask, rng, noise=0.05):
    """A soft mask: 0.9 inside, 0.1 outside, with a little noise (distinct values)."""
    return np.where(mask, 0.9, 0.1) + rng.uniform(-noise, noise, mask.shape)


# ------------------------------------------------------------------- Betti numbers


def test_betti_numbers_of_known_shapes():
    disk = _ball((15, 15), (7, 7), 25)
    ring = disk & ~_ball((15, 15), (7, 7), 4)
    two = _ball((15, 15), (3, 3), 4) | _ball((15, 15), (11, 11), 4)
    assert betti_numbers(disk) == (1, 0)
    assert betti_numbers(ring) == (1, 1)
    assert betti_numbers(two) == (2, 0)
    assert betti_numbers(np.zeros((6, 6), bool)) == (0, 0)
    diag = np.zeros((4, 4), bool)
    diag[1, 1] = diag[2, 2] = True  # touching at a corner: one component (closed cubes, 8-connected)
    assert betti_numbers(diag) == (1, 0)
    ball = _ball((11, 11, 11), (5, 5, 5), 16)
    shell = ball & ~_ball((11, 11, 11), (5, 5, 5), 2)
    assert betti_numbers(ball) == (1, 0, 0)
    assert betti_numbers(shell) == (1, 0, 1)
    tube = np.zeros((7, 9, 9), bool)
    tube[2:5, 1:8, 1:8] = True
    tube[:, 3:6, 3:6] = False  # a square tube through the volume: one tunnel
    assert betti_numbers(tube) == (1, 1, 0)
    np.testing.assert_array_equal(betti_numbers_batch(np.stack([disk, ring, two])), [[1, 0], [1, 1], [2, 0]])
    with pytest.raises(TopoCAMError, match="2D or 3D mask"):
        betti_numbers(np.zeros(5, bool))


def test_persistence_cells_give_gudhis_diagram():
    """The (birth, death) pixels, read in the image, give GUDHI's own persistence diagram of
    the superlevel filtration: the Fortran-order cell numbering is converted correctly."""
    gudhi = pytest.importorskip("gudhi")
    rng = np.random.default_rng(3)
    for shape in [(6, 9), (4, 5, 6)]:
        p = rng.random(shape)
        cc = gudhi.CubicalComplex(top_dimensional_cells=1 - p)
        ref = sorted((d, round(1 - b, 9), round(1 - de, 9) if np.isfinite(de) else -1.0) for d, (b, de) in cc.persistence())
        flat = p.reshape(-1)
        got = sorted(
            (d, round(flat[b], 9), round(flat[de], 9) if de >= 0 else -1.0)
            for d, (births, deaths) in enumerate(persistence_cells(p))
            for b, de in zip(births, deaths)
            if de < 0 or flat[b] != flat[de]
        )
        assert got == ref


# ------------------------------------------------------------------- topology loss


@pytest.mark.parametrize("shape,target", [((6, 7), (1, 1)), ((4, 4, 5), (1, 1, 1)), ((5, 5), (0, 0))])
def test_topo_loss_gradcheck(shape, target):
    """Analytic gradients against finite differences, in float64 (the pairing is locally
    constant for distinct pixel values, so the loss is smooth there)."""
    rng = np.random.default_rng(0)
    p = torch.tensor(rng.uniform(0.05, 0.95, (2, *shape)), dtype=torch.float64, requires_grad=True)
    targets = [target, tuple(1 for _ in target)]
    assert torch.autograd.gradcheck(lambda q: topo_loss(q, targets), (p,), eps=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(topo_loss(p, targets), p)
    assert grad.abs().sum() > 0  # the loss does reach the pixels


def test_topo_loss_is_zero_on_a_binary_mask_of_the_target_topology():
    ring = _ball((12, 12), (6, 6), 16) & ~_ball((12, 12), (6, 6), 2)
    p = torch.tensor(ring, dtype=torch.float64)[None]
    assert float(topo_loss(p, [(1, 1)])) == 0.0
    assert float(topo_loss(p, [(1, 0)])) == pytest.approx(1.0)  # the one hole is pushed to none: (1 - 0)^2


def _descend(p0: np.ndarray, target: tuple[int, ...], steps: int = 300) -> tuple[int, ...]:
    """Adam on the logits of ``p0`` with topo_loss alone, until the mask (>= 0.5) has the
    target Betti numbers; returns the Betti numbers reached."""
    z = torch.logit(torch.tensor(p0, dtype=torch.float64).clamp(1e-3, 1 - 1e-3)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        topo_loss(torch.sigmoid(z)[None], [target]).backward()
        opt.step()
        reached = betti_numbers(torch.sigmoid(z).detach().numpy() >= 0.5)
        if reached == target:
            break
    return reached


def test_descent_opens_a_hole_in_a_solid_disk():
    p = _soft(_ball((16, 16), (7.5, 7.5), 25), np.random.default_rng(0))
    assert betti_numbers(p >= 0.5) == (1, 0)
    assert _descend(p, (1, 1)) == (1, 1)


def test_descent_merges_two_blobs_and_removes_a_speck():
    rng = np.random.default_rng(1)
    two = _ball((16, 16), (7.5, 4), 9) | _ball((16, 16), (7.5, 11.5), 9)
    p = _soft(two, rng)
    assert betti_numbers(p >= 0.5) == (2, 0)
    assert _descend(p, (1, 0)) == (1, 0)
    speck = _soft(_ball((16, 16), (7.5, 7.5), 25), rng)
    speck[1, 13:15] = 0.7
    assert betti_numbers(speck >= 0.5) == (2, 0)
    assert _descend(speck, (1, 0)) == (1, 0)


def test_descent_hollows_a_ball_in_3d():
    p = _soft(_ball((10, 10, 10), (4.5, 4.5, 4.5), 12), np.random.default_rng(2))
    assert betti_numbers(p >= 0.5) == (1, 0, 0)
    assert _descend(p, (1, 0, 1)) == (1, 0, 1)


def test_topo_loss_refuses_mismatched_targets():
    with pytest.raises(TopoCAMError, match="2 target Betti vectors for 3 images"):
        topo_loss(torch.rand(3, 5, 5), [(1, 0), (1, 0)])
    with pytest.raises(TopoCAMError, match="expects probabilities"):
        topo_loss(torch.rand(5, 5), [(1, 0)] * 5)


# ------------------------------------------------------------------- the network


class _Forbidden:
    """Stands for the test split in training: any read fails the test."""

    def __getitem__(self, key):
        raise AssertionError("the segmenter read the test split while training")

    def __len__(self):
        raise AssertionError("the segmenter read the test split while training")


def _without_test(ds):
    return dataclasses.replace(
        ds, x={**ds.x, "test": _Forbidden()}, lesion_masks={**ds.lesion_masks, "test": _Forbidden()},
    )


def test_segmenter_beats_chance_dice_and_is_cached(synth2d, tmp_path):
    """Trained on train (test unreadable), chosen on val; on test its Dice beats two chance
    levels by a wide margin: the all-foreground mask, and a random mask with the predicted
    mask's voxel count per image. A second call loads it (no training) and predicts the same;
    a corrupted file is named and rebuilt, to the same weights (seeded)."""
    settings = SegmenterSettings(epochs=12, seed=0)
    seg = train_segmenter(_without_test(synth2d), settings, cache_dir=tmp_path)
    assert not seg.info.cached and 1 <= seg.info.best_epoch <= 12 and len(seg.info.history) == 12
    assert seg.info.best_val_dice == max(h["val_dice"] for h in seg.info.history)
    truth = synth2d.lesion_masks["test"]
    proba = seg.predict_proba(synth2d.x["test"])
    assert proba.shape == truth.shape and proba.dtype == np.float32 and 0 <= proba.min() and proba.max() <= 1
    masks = seg.masks(synth2d.x["test"])
    np.testing.assert_array_equal(masks, proba >= 0.5)
    ours = float(dice(masks, truth).mean())
    all_foreground = float(dice(np.ones_like(truth), truth).mean())
    random_same_size = float(dice(random_masks_like(masks, np.random.default_rng(0)), truth).mean())
    assert ours > max(all_foreground, random_same_size) + 0.4, (ours, all_foreground, random_same_size)

    again = train_segmenter(_without_test(synth2d), settings, cache_dir=tmp_path)
    assert again.info.cached and again.info.history == seg.info.history
    np.testing.assert_array_equal(again.predict_proba(synth2d.x["test"]), proba)

    other_masks = {**synth2d.lesion_masks, "train": ~synth2d.lesion_masks["train"]}  # same images, other masks
    retrained = train_segmenter(dataclasses.replace(synth2d, lesion_masks=other_masks), replace(settings, epochs=1),
                                cache_dir=tmp_path)
    assert not retrained.info.cached and retrained.info.cache_key != train_segmenter(
        synth2d, replace(settings, epochs=1), cache_dir=tmp_path).info.cache_key

    ckpt = tmp_path / "segmenters" / f"{seg.info.cache_key}.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.warns(CorruptCacheWarning, match="rebuilding"):
        rebuilt = train_segmenter(synth2d, settings, cache_dir=tmp_path)
    assert not rebuilt.info.cached
    np.testing.assert_array_equal(rebuilt.predict_proba(synth2d.x["test"]), proba)


def test_segmenter_refuses_data_without_masks_and_bad_settings(synth2d, tmp_path):
    bare = dataclasses.replace(synth2d, name="breastmnist", lesion_masks=None)
    with pytest.raises(TopoCAMError, match="roi = segmenter needs ground-truth lesion masks .*; breastmnist has none"):
        train_segmenter(bare, SegmenterSettings(), cache_dir=tmp_path)
    with pytest.raises(TopoCAMError, match="unknown segmenter loss 'topo'; choose one of dice, dice\\+topo"):
        train_segmenter(synth2d, SegmenterSettings(loss="topo"), cache_dir=tmp_path)
    with pytest.raises(TopoCAMError, match="epochs must be >= 1"):
        train_segmenter(synth2d, SegmenterSettings(epochs=0), cache_dir=tmp_path)
    assert not (tmp_path / "segmenters").exists()


@pytest.mark.parametrize("ndim,size", [(2, 18), (3, 13)])
def test_dice_topo_trains_with_a_finite_loss_path(ndim, size, tmp_path):
    """Tiny sets at sizes the U-Net's strides do not divide (padded, cropped back)."""
    from topocam.core.data import make_synthetic

    ds = make_synthetic(ndim, size=size, n=(8, 4, 4), seed=0, clutter=1)
    settings = SegmenterSettings(loss="dice+topo", epochs=3, batch_size=4, topo_warmup=1)
    seg = train_segmenter(ds, settings, cache_dir=tmp_path)
    losses = [h[k] for h in seg.info.history for k in ("loss", "dice_loss", "topo_loss")]
    assert len(seg.info.history) == 3 and all(np.isfinite(losses))
    assert seg.info.history[0]["topo_loss"] == 0  # the warm-up epoch: Dice alone
    assert all(h["topo_loss"] > 0 for h in seg.info.history[1:])  # then the term is computed, not skipped
    assert seg.info.loss == "dice+topo"
    assert seg.masks(ds.x["test"]).shape == (4, *(size,) * ndim)
    assert seg.masks(ds.x["test"][:, 0]).shape == (4, *(size,) * ndim)  # one channel: (n, *spatial) accepted too
    assert seg.masks(ds.x["test"][:0]).shape == (0, *(size,) * ndim)
