"""The fast Betti backend gives exactly the numbers of GUDHI's cubical
persistence (the reference), and of giotto-tda where the optional extra is
installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from topocam.core.errors import TopoCAMError
from topocam.core.roi import segment
from topocam.core.topology import BettiGrid, betti_curves

from .reference import gudhi_betti_curves, needs_giotto

MEDMNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist"

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def both(filtrations: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = gudhi_betti_curves(filtrations, thresholds)
    fast = betti_curves(filtrations, thresholds, backend="fast")
    return ref, fast


def assert_same(filtrations: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    ref, fast = both(filtrations, thresholds)
    assert fast.dtype == np.int64
    assert fast.shape == ref.shape == (len(filtrations), filtrations.ndim - 1, np.asarray(thresholds).size)
    np.testing.assert_array_equal(fast, ref)
    return fast


# ----------------------------------------------------------------------------- strategies


@st.composite
def batches(draw, ndim: int, max_side: int):
    """A batch of 1..3 small integer-valued images (many ties), masked in one
    of the outside modes (or not at all), sometimes constant or all +inf."""
    shape = tuple(draw(st.integers(1, max_side)) for _ in range(ndim))
    n = draw(st.integers(1, 3))
    levels = draw(st.integers(1, 6))
    images = draw(hnp.arrays(np.int64, (n, *shape), elements=st.integers(0, levels - 1))).astype(np.float64)
    kind = draw(st.sampled_from(["plain", "zero", "exclude", "exclude", "constant", "all_inf"]))
    if kind in ("zero", "exclude"):
        masks = draw(hnp.arrays(np.bool_, (n, *shape)))
        images = segment(images, masks, kind)
    elif kind == "constant":
        images[:] = draw(st.integers(0, levels - 1))
    elif kind == "all_inf":
        images[:] = np.inf
    return images


@st.composite
def thresholds_for(draw, filtrations: np.ndarray):
    """Thresholds from BettiGrid.fit, or arbitrary ones (on value ties, between
    values, below and above every value, duplicated)."""
    if draw(st.booleans()):
        return BettiGrid.fit(filtrations, draw(st.integers(2, 12))).thresholds
    values = st.one_of(st.integers(-2, 7).map(float), st.floats(-2.0, 7.0, allow_nan=False))
    return np.sort(np.array(draw(st.lists(values, min_size=1, max_size=12)), dtype=np.float64))


@st.composite
def cases(draw, ndim: int, max_side: int):
    filtrations = draw(batches(ndim, max_side))
    return filtrations, draw(thresholds_for(filtrations))


# ----------------------------------------------------------------------------- properties


@SETTINGS
@given(cases(ndim=2, max_side=10))
def test_2d_matches_gudhi(case):
    assert_same(*case)


@SETTINGS
@given(cases(ndim=3, max_side=7))
def test_3d_matches_gudhi(case):
    assert_same(*case)


@settings(max_examples=100, deadline=None)
@given(cases(ndim=3, max_side=10), st.booleans())
def test_odd_shapes_and_real_valued(case, real):
    filtrations, thresholds = case
    if real:  # distinct real values, then thresholds between them
        rng = np.random.default_rng(filtrations.size)
        filtrations = np.where(np.isfinite(filtrations), filtrations + rng.random(filtrations.shape), np.inf)
    assert_same(filtrations, thresholds)


@settings(max_examples=100, deadline=None)
@given(batches(ndim=2, max_side=6), st.lists(st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 2.0, 9.0, np.inf, np.nan]), max_size=8))
def test_non_finite_and_unsorted_thresholds(filtrations, thresholds):
    """Unsorted thresholds; at NaN and +-inf nothing is alive (at -inf because
    giotto-tda, whose convention the fast backend keeps, stores a birth at -inf
    as -DBL_MAX; the GUDHI reference does the same)."""
    assert_same(filtrations, np.array(thresholds, dtype=np.float64))


@pytest.mark.parametrize("shape", [(1, 1), (1, 1, 1), (1, 9), (9, 1), (1, 1, 6), (1, 6, 1), (3, 5, 7)])
@pytest.mark.parametrize("fill", [0.0, 2.5, np.inf])
def test_single_voxels_constant_and_infinite(shape, fill):
    filtrations = np.full((2, *shape), fill)
    assert_same(filtrations, np.array([-1.0, 0.0, 2.5, 3.0]))
    assert_same(filtrations, BettiGrid.fit(filtrations, 4).thresholds)


def test_minus_inf_values():
    rng = np.random.default_rng(0)
    f = rng.integers(0, 3, (4, 5, 6, 4)).astype(np.float64)
    f[rng.random(f.shape) < 0.2] = -np.inf
    f[rng.random(f.shape) < 0.2] = np.inf
    assert_same(f, np.array([-np.inf, -5.0, 0.0, 1.0, 2.0, np.inf]))


# ----------------------------------------------------------------------------- hand-checked cases


def test_conventions_2d():
    """Pixels are closed squares: diagonal pixels touch (8-connected sublevel
    set), and a diagonal ring encloses its centre (4-connected complement)."""
    diag = np.array([[[0.0, 1.0], [1.0, 0.0]]])
    np.testing.assert_array_equal(assert_same(diag, np.array([0.0]))[0, :, 0], [1, 0])
    diamond = np.ones((1, 3, 3))
    diamond[0, [0, 1, 1, 2], [1, 0, 2, 1]] = 0.0
    np.testing.assert_array_equal(assert_same(diamond, np.array([0.0, 1.0]))[0], [[1, 1], [1, 0]])


def test_ring_2d():
    ring = np.ones((1, 7, 7))
    ring[0, 1:6, 1:6] = 0.0
    ring[0, 2:5, 2:5] = 1.0
    out = assert_same(ring, np.array([-1.0, 0.0, 1.0]))[0]
    np.testing.assert_array_equal(out, [[0, 1, 1], [0, 1, 0]])


def test_hollow_cube_3d():
    vol = np.ones((1, 7, 7, 7))
    vol[0, 1:6, 1:6, 1:6] = 0.0
    vol[0, 2:5, 2:5, 2:5] = 1.0
    out = assert_same(vol, np.array([0.0, 1.0]))[0]
    np.testing.assert_array_equal(out[:, 0], [1, 0, 1])  # a sphere
    np.testing.assert_array_equal(out[:, 1], [1, 0, 0])  # the whole cube


def test_solid_torus_3d():
    vol = np.ones((1, 3, 7, 7))
    vol[0, 1, 1:6, 1:6] = 0.0
    vol[0, 1, 2:5, 2:5] = 1.0  # a square annulus, one voxel thick
    out = assert_same(vol, np.array([0.0]))[0]
    np.testing.assert_array_equal(out[:, 0], [1, 1, 0])


def test_inf_voxels_never_enter():
    f = np.array([[[0.0, np.inf, 0.0]]])
    np.testing.assert_array_equal(assert_same(f, np.array([0.0, 1e300]))[0], [[2, 2], [0, 0]])


# ----------------------------------------------------------------------------- threads, errors


def test_threads_give_identical_output():
    rng = np.random.default_rng(1)
    f = rng.integers(0, 5, (23, 6, 7, 5)).astype(np.float64)
    f = segment(f, rng.random(f.shape) < 0.6, "exclude")
    grid = BettiGrid.fit(f, 9).thresholds
    one = betti_curves(f, grid, backend="fast", n_jobs=1)
    np.testing.assert_array_equal(betti_curves(f, grid, backend="fast", n_jobs=2), one)
    np.testing.assert_array_equal(betti_curves(f, grid, backend="fast", n_jobs=-1), one)
    np.testing.assert_array_equal(gudhi_betti_curves(f, grid), one)


def test_nan_values_are_rejected():
    f = np.zeros((1, 3, 3))
    f[0, 1, 1] = np.nan
    with pytest.raises(TopoCAMError, match="NaN"):
        betti_curves(f, np.array([0.0, 1.0]), backend="fast")


def test_no_thresholds_and_no_images():
    assert betti_curves(np.zeros((2, 3, 3)), np.array([]), backend="fast").shape == (2, 2, 0)
    assert betti_curves(np.zeros((0, 3, 3, 3)), np.array([0.0]), backend="fast").shape == (0, 3, 1)


# ----------------------------------------------------------------------------- real data


def _smooth(vol: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(vol, sigma=2)


@pytest.mark.parametrize("outside", ["zero", "exclude"])
def test_adrenalmnist3d_matches_gudhi(outside):
    path = MEDMNIST / "adrenalmnist3d.npz"
    if not path.exists():
        pytest.skip(f"AdrenalMNIST3D not found at {path} (put adrenalmnist3d.npz there to run this test)")
    with np.load(path) as data:
        images = data["train_images"][:50].astype(np.float64) / 255.0
    rng = np.random.default_rng(0)
    masks = np.stack([_smooth(im + 0.5 * rng.random(im.shape)) for im in images])
    masks = masks > np.quantile(masks, 0.6, axis=(1, 2, 3), keepdims=True)
    filtrations = segment(images, masks, outside)
    grid = BettiGrid.fit(filtrations, 50)
    out = assert_same(filtrations, grid.thresholds)
    assert out[:, 0].max() > 0


# ----------------------------------------------------------------------------- giotto-tda (optional extra)


@needs_giotto
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("outside", ["zero", "exclude"])
def test_giotto_backend_matches_fast(ndim, outside):
    rng = np.random.default_rng(ndim)
    shape = (12, *([9] * ndim))
    f = segment(rng.integers(0, 5, shape).astype(np.float64), rng.random(shape) < 0.6, outside)
    thresholds = np.concatenate([BettiGrid.fit(f, 9).thresholds, [-np.inf, np.inf, np.nan, -1.0]])
    np.testing.assert_array_equal(
        betti_curves(f, thresholds, backend="giotto"), betti_curves(f, thresholds, backend="fast")
    )


def test_giotto_backend_missing_names_the_extra(monkeypatch):
    """Without giotto-tda the backend fails with one sentence naming the extra,
    before any work (checked by the config too, so a run fails at once)."""
    import importlib.util

    from topocam.core.pipeline import TopoCAMConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gtda" else real(name, *a))
    with pytest.raises(TopoCAMError, match=r"pip install -e '\.\[giotto\]'"):
        betti_curves(np.zeros((1, 3, 3)), np.array([0.0]), backend="giotto")
    with pytest.raises(TopoCAMError, match="giotto-tda, which is not installed"):
        TopoCAMConfig(betti_backend="giotto").validated()
