"""Reference Betti curves from GUDHI's cubical persistence (a test dependency),
and giotto-tda's when the optional extra is installed.

GUDHI and giotto-tda share the convention of ``topocam.topology``: pixels are
the top-dimensional cells, unreduced homology over Z/2, essential classes die
at +inf, and a class is alive at t when b <= t < d.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import pytest

HAS_GIOTTO = importlib.util.find_spec("gtda") is not None
# .ci/run's giotto step sets this: there a missing giotto-tda fails the tests
# instead of skipping them, so the step cannot pass having compared nothing.
REQUIRE_GIOTTO = os.environ.get("TOPOCAM_REQUIRE_GIOTTO", "") not in ("", "0")
MISSING_GIOTTO = "giotto-tda is not installed (optional extra: pip install -e '.[giotto]')"


def needs_giotto(test):
    """Run ``test`` only with giotto-tda: skip it without the extra, or fail it
    when TOPOCAM_REQUIRE_GIOTTO=1."""
    if HAS_GIOTTO:
        return test
    if not REQUIRE_GIOTTO:
        return pytest.mark.skip(reason=MISSING_GIOTTO)(test)

    @functools.wraps(test)  # keeps the signature and the parametrize marks
    def required(*args, **kwargs):
        pytest.fail(f"TOPOCAM_REQUIRE_GIOTTO=1 but {MISSING_GIOTTO}", pytrace=False)

    return required


def gudhi_betti_curves(filtrations: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Integer Betti curves (n_images, d, n_thresholds) computed with GUDHI."""
    import gudhi

    filtrations = np.asarray(filtrations, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    n, *shape = filtrations.shape
    d = len(shape)
    out = np.zeros((n, d, thresholds.size), dtype=np.int64)
    # giotto-tda stores a value of -inf as -DBL_MAX, so nothing is alive at a
    # threshold of -inf; the fast backend keeps that convention.
    lowest = -np.finfo(np.float64).max
    for i in range(n):
        cc = gudhi.CubicalComplex(top_dimensional_cells=np.maximum(filtrations[i], lowest))
        cc.compute_persistence(homology_coeff_field=2, min_persistence=-1)
        for k in range(d):
            iv = np.asarray(cc.persistence_intervals_in_dimension(k), dtype=np.float64).reshape(-1, 2)
            alive = (iv[:, 0, None] <= thresholds[None, :]) & (thresholds[None, :] < iv[:, 1, None])
            out[i, k] = alive.sum(axis=0)
    return out
