"""Betti curves of the segmented input X' (the paper's phi).

This module owns one decision of the protocol, the Betti grid: ONE fixed set
of thresholds per dataset, fitted on the training split only
(:meth:`BettiFeatures.fit`), so a feature column means the same threshold for
every image. The filtration it reads is the segmented image X' of
``roi.RoiSelector.segment`` (the sublevel cubical filtration; voxels outside the
ROI are 0 or never enter it).

Betti curves count, at each threshold t, the persistence intervals [b, d) of
homology dimension k with b <= t < d, i.e. beta_k of the sublevel set
{X' <= t}. Homology is *unreduced* (the essential component is counted) and
essential classes never die (death = +inf). Pixels are the top-dimensional
cubes of the complex (giotto-tda / GUDHI convention), so the sublevel set is
8-connected in 2D and 26-connected in 3D.

Backends: ``fast`` (exact union-find / Euler characteristic, see
``betti_fast``; the default) and ``giotto`` (giotto-tda ``CubicalPersistence``,
an optional extra: ``pip install -e '.[giotto]'``). The tests check ``fast``
against GUDHI's cubical persistence, and against giotto-tda where it is
installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .choices import BETTI_BACKENDS
from .errors import TopoCAMError

Backend = Literal["fast", "giotto"]
BACKENDS = BETTI_BACKENDS


GIOTTO_MISSING = (
    "the giotto Betti backend needs giotto-tda, which is not installed; "
    "install the extra with: pip install -e '.[giotto]' "
    "(or use --betti-backend fast, which gives the same numbers)"
)


def check_backend(backend: str) -> None:
    """A known backend whose package is installed (giotto-tda is an optional extra)."""
    if backend not in BACKENDS:
        raise TopoCAMError(f"unknown Betti backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "giotto" and importlib.util.find_spec("gtda") is None:
        raise TopoCAMError(GIOTTO_MISSING)


@dataclass(frozen=True)
class BettiGrid:
    """The thresholds at which every image's Betti curves are sampled."""

    thresholds: np.ndarray

    @property
    def n_bins(self) -> int:
        return int(self.thresholds.size)

    @classmethod
    def fit(cls, train_filtrations: np.ndarray, n_bins: int) -> "BettiGrid":
        """Evenly spaced thresholds over the finite filtration values of the
        *training* split. Pass nothing but training data here."""
        return cls.fit_chunks([train_filtrations], n_bins)

    @classmethod
    def fit_chunks(cls, train_chunks: Iterable[np.ndarray], n_bins: int) -> "BettiGrid":
        """:meth:`fit` over the training split given a chunk of images at a time:
        the same grid, bit for bit (only the finite minimum and maximum matter)."""
        if n_bins < 2:
            raise TopoCAMError(f"bins must be at least 2, got {n_bins}")
        lo, hi = np.inf, -np.inf
        for chunk in train_chunks:
            values = np.asarray(chunk, dtype=np.float64)
            finite = values[np.isfinite(values)]
            if finite.size:
                lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
        if lo > hi:  # every training ROI empty (exclude mode): a defined, documented fallback
            lo, hi = 0.0, 1.0
        elif hi <= lo:
            hi = lo + 1.0
        return cls(np.linspace(lo, hi, n_bins))


def _alive_counts(diagrams: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Intervals [b, d) alive at each threshold (b <= t < d), per image:
    (n_images, n_thresholds) from diagrams (n_images, n_points, 2)."""
    t = np.asarray(thresholds, dtype=np.float64).reshape(1, 1, -1)
    alive = (diagrams[:, :, 0, None] <= t) & (t < diagrams[:, :, 1, None])
    return alive.sum(axis=1)


def _betti_curves_giotto(filtrations: np.ndarray, thresholds: np.ndarray, n_jobs: int = 1) -> np.ndarray:
    try:
        from gtda.homology import CubicalPersistence
    except ImportError as exc:
        raise TopoCAMError(GIOTTO_MISSING) from exc

    n, *shape = filtrations.shape
    dims = tuple(range(len(shape)))
    cp = CubicalPersistence(
        homology_dimensions=dims, coeff=2, reduced_homology=False, infinity_values=np.inf, n_jobs=n_jobs
    )
    diagrams = cp.fit_transform(filtrations)
    out = np.zeros((n, len(dims), thresholds.size), dtype=np.int64)
    for k in dims:
        dk = diagrams[:, :, :2].copy()
        other = diagrams[:, :, 2] != k
        dk[other, 1] = dk[other, 0]  # an empty interval [b, b) is never alive
        out[:, k, :] = _alive_counts(dk, thresholds)
    return out


def betti_curves(
    filtrations: np.ndarray, thresholds: np.ndarray, backend: Backend = "fast", n_jobs: int = 1
) -> np.ndarray:
    """Integer Betti curves, shape (n_images, d, n_bins), dimensions 0..d-1."""
    check_backend(backend)
    filtrations = np.asarray(filtrations, dtype=np.float64)
    if filtrations.ndim not in (3, 4):
        raise TopoCAMError(f"expected a batch of 2D or 3D images, got shape {filtrations.shape}")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if filtrations.shape[0] == 0:
        return np.zeros((0, filtrations.ndim - 1, thresholds.size), dtype=np.int64)
    if backend == "giotto":
        return _betti_curves_giotto(filtrations, thresholds, n_jobs=n_jobs)
    from .betti_fast import betti_curves_fast

    return betti_curves_fast(filtrations, thresholds, n_jobs=n_jobs)


def roi_counts(masks: np.ndarray) -> np.ndarray:
    """Voxels in each image's ROI, (n,) int64."""
    masks = np.asarray(masks, dtype=bool)
    return masks.reshape(len(masks), -1).sum(axis=1)


def features_from_filtrations(
    filtrations: np.ndarray,
    counts: np.ndarray,
    grid: BettiGrid,
    backend: Backend = "fast",
    n_jobs: int = 1,
    progress: bool = False,
    desc: str = "Betti curves",
) -> np.ndarray:
    """phi from segmented images (``segment``) and their ROI counts
    (``roi_counts``): Betti curves divided by the ROI voxel count, with the count
    appended, (n, d * n_bins + 1) float32. An empty ROI gives zeros and a count
    of 0 (its image is kept, never dropped)."""
    n = filtrations.shape[0]
    d = filtrations.ndim - 1
    feats = np.zeros((n, d * grid.n_bins + 1), dtype=np.float32)
    feats[:, -1] = counts
    nonempty = np.flatnonzero(counts > 0)
    from tqdm.auto import tqdm

    chunk = 256 if progress else max(1, nonempty.size)
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        bar.update(n - nonempty.size)  # empty ROIs: zeros and a count of 0, nothing to compute
        for start in range(0, nonempty.size, chunk):
            idx = nonempty[start : start + chunk]
            curves = betti_curves(filtrations[idx], grid.thresholds, backend=backend, n_jobs=n_jobs)
            feats[idx, :-1] = (curves.reshape(idx.size, -1) / counts[idx, None]).astype(np.float32)
            bar.update(idx.size)
    return feats


def features_per_image_grid(
    filtrations: np.ndarray, counts: np.ndarray, n_bins: int, backend: Backend = "fast", n_jobs: int = 1,
) -> np.ndarray:
    """The reference implementation's shortcut, for the leakage audit only: each image's
    Betti curves sampled on a grid fitted to that image's own filtration range (so a
    curve's bins mean something different in every image, and test images shape their
    own features). The honest path is :meth:`BettiGrid.fit` on the training split."""
    n = filtrations.shape[0]
    feats = np.zeros((n, (filtrations.ndim - 1) * n_bins + 1), dtype=np.float32)
    feats[:, -1] = counts
    for i in np.flatnonzero(counts > 0):
        grid = BettiGrid.fit(filtrations[i : i + 1], n_bins)
        curves = betti_curves(filtrations[i : i + 1], grid.thresholds, backend=backend, n_jobs=n_jobs)
        feats[i, :-1] = (curves.reshape(-1) / counts[i]).astype(np.float32)
    return feats


@dataclass
class BettiFeatures:
    """phi as a fitted stage: :meth:`fit` learns the Betti grid (``grid_``) from the
    training split's filtrations, given a chunk of images at a time; :meth:`transform`
    turns any split's filtrations and ROI counts into features on that grid and
    refuses to run unfitted. ``grid="per_image"`` is the leakage audit's shortcut
    (each image binned on its own range; ``grid_`` is still fitted and reported)."""

    bins: int = 50
    backend: Backend = "fast"
    grid: str = "train"
    n_jobs: int = 1
    grid_: BettiGrid | None = field(default=None, repr=False)

    @classmethod
    def of(cls, cfg, n_jobs: int = 1) -> "BettiFeatures":
        """The (unfitted) stage of a configuration (a ``TopoCAMConfig``)."""
        return cls(cfg.bins, cfg.betti_backend, cfg.betti_grid, n_jobs)

    @classmethod
    def fitted(cls, grid: BettiGrid, backend: Backend = "fast", n_jobs: int = 1) -> "BettiFeatures":
        """A stage whose grid was fitted before (an exported model's, stored with it)."""
        return cls(grid.n_bins, backend, "train", n_jobs, grid)

    def fit(self, train_filtrations: Iterable[np.ndarray]) -> "BettiFeatures":
        """Learn the grid from the training split only (chunks of its filtrations)."""
        self.grid_ = BettiGrid.fit_chunks(train_filtrations, self.bins)
        return self

    def transform(self, filtrations: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Features of segmented images (``RoiSelector.segment``) with their ROI counts."""
        if self.grid_ is None:
            raise TopoCAMError("BettiFeatures.transform before fit: fit the Betti grid on the training split first")
        if self.grid == "per_image":
            return features_per_image_grid(filtrations, counts, self.bins, self.backend, self.n_jobs)
        return features_from_filtrations(filtrations, counts, self.grid_, backend=self.backend, n_jobs=self.n_jobs)
