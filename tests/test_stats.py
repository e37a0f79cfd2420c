"""Seed summaries and bootstrap intervals, checked against MedMNIST's metric definitions."""

from __future__ import annotations

import numpy as np
import pytest

from topocam.core.metrics import evaluate
from topocam.core.stats import mean_sd, resampled_metric, seed_mean_ci, stratified_indices, summarise_method


def _probs(rng, n, k):
    p = rng.random((n, k)) ** 3
    p[rng.random(n) < 0.2] = 0.5  # ties, which the rank AUC must average as roc_auc_score does
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("task,k", [("binary-class", 2), ("multi-class", 4)])
def test_resampled_metrics_equal_medmnist_metrics_on_each_resample(task, k):
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, 60)
    p = _probs(rng, 60, k)
    idx = stratified_indices(y, 5, rng)
    for metric in ("auc", "acc"):
        fast = resampled_metric(y, p, task, metric, idx)
        slow = [evaluate(y[i], p[i], task)[metric] for i in idx]
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)


def test_stratified_resamples_keep_class_counts():
    y = np.array([0] * 7 + [1] * 3)
    idx = stratified_indices(y, 50, np.random.default_rng(1))
    assert idx.shape == (50, 10)
    assert (np.sort(y[idx], axis=1) == np.sort(y)).all()


def test_interval_brackets_the_seed_mean_and_narrows_with_more_images():
    rng = np.random.default_rng(2)

    def seeds(n):
        y = np.arange(n) % 2
        return y, [np.stack([1 - (s := np.clip(0.5 + 0.3 * (y - 0.5) + 0.25 * rng.standard_normal(n), 0, 1)), s], 1)
                   for _ in range(3)]

    widths = []
    for n in (40, 400):
        y, ps = seeds(n)
        mean = np.mean([evaluate(y, p, "binary-class")["auc"] for p in ps])
        lo, hi = seed_mean_ci(y, ps, "binary-class", "auc", n_boot=400)
        assert lo < mean < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_mean_sd_single_seed_has_sd_zero_and_skips_nan():
    assert mean_sd([0.7]) == {"mean": 0.7, "sd": 0.0, "n": 1}
    s = mean_sd([0.6, float("nan"), 0.8])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.7) and s["sd"] == pytest.approx(np.std([0.6, 0.8], ddof=1))


def test_summarise_method_layout():
    rng = np.random.default_rng(3)
    y = np.arange(30) % 2
    ps = [_probs(rng, 30, 2) for _ in range(2)]
    out = summarise_method([evaluate(y, p, "binary-class") for p in ps], y, ps, "binary-class")
    assert set(out) == {"auc", "acc", "sensitivity", "specificity", "f1"}
    assert "ci95" in out["auc"] and "ci95" in out["acc"] and "ci95" not in out["f1"]
    assert out["auc"]["n"] == 2
