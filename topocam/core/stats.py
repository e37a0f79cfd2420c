"""Numbers over seeds: mean ± sd and a bootstrap 95 % interval (DESIGN.md §2.7).

A reported number is the mean over seeds (backbone and MLP seeds varied on
fixed data). Its interval is a stratified bootstrap over the evaluation images:
each resample draws every class's images with replacement (so both classes are
always present and the AUC is defined), every seed's model is scored on the
same resample, and the seed-mean is taken. The 2.5 and 97.5 percentiles of
that seed-mean are the interval: it covers the uncertainty of a finite test
set, which one seed's sd does not.

The resampled AUC and ACC are MedMNIST's definitions (binary AUC of the
positive-class score, macro one-vs-rest AUC for multi-class; ACC at 0.5 for
binary), computed on ranks for all resamples at once; ``tests`` check them
against :func:`topocam.metrics.evaluate` on the unresampled data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from .metrics import predicted_labels

N_BOOTSTRAP = 1000
CI_METRICS: tuple[str, ...] = ("auc", "acc")


def mean_sd(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample sd (ddof=1; 0 for a single value) of the finite values."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def format_mean_sd(stat: dict | None, with_n: bool = False) -> str:
    """``0.912 ± 0.034`` (the sd left out for a single value; ``—`` when there is none)."""
    if not stat or not stat.get("n") or not math.isfinite(stat["mean"]):
        return "—"
    text = f"{stat['mean']:.3f}" + (f" ± {stat['sd']:.3f}" if stat["n"] > 1 else "")
    return text + (f" (n={stat['n']})" if with_n else "")


def _auc_rows(y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Binary AUC of each row (Mann-Whitney on average ranks, as roc_auc_score)."""
    ranks = rankdata(score, axis=1)
    pos = y.astype(bool)
    n1 = pos.sum(axis=1).astype(float)
    n0 = y.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * pos).sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def resampled_metric(y_true: np.ndarray, probs: np.ndarray, task: str, metric: str, idx: np.ndarray) -> np.ndarray:
    """``metric`` of ``probs`` on each resample (row of ``idx``): shape (len(idx),)."""
    y = np.asarray(y_true).reshape(-1)[idx]
    p = np.asarray(probs, dtype=np.float64)[idx]  # (B, n, k)
    if metric == "acc":
        pred = predicted_labels(p.reshape(-1, p.shape[-1]), task).reshape(y.shape)
        return (pred == y).mean(axis=1)
    if metric != "auc":
        raise ValueError(f"no resampled form for metric {metric!r}; choose one of {CI_METRICS}")
    if task == "binary-class":
        return _auc_rows(y, p[..., -1])
    return np.mean([_auc_rows(y == c, p[..., c]) for c in range(p.shape[-1])], axis=0)


def stratified_indices(y_true: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) resamples that keep each class's count."""
    y = np.asarray(y_true).reshape(-1)
    out = np.empty((n_boot, y.size), dtype=np.int64)
    col = 0
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        out[:, col : col + members.size] = rng.choice(members, size=(n_boot, members.size), replace=True)
        col += members.size
    return out


def seed_mean_ci(
    y_true: np.ndarray, probs_per_seed: Sequence[np.ndarray], task: str, metric: str,
    n_boot: int = N_BOOTSTRAP, seed: int = 0, level: float = 0.95,
) -> list[float]:
    """Bootstrap interval of the seed-mean of ``metric`` (see the module doc)."""
    idx = stratified_indices(y_true, n_boot, np.random.default_rng(seed))
    means = np.mean([resampled_metric(y_true, p, task, metric, idx) for p in probs_per_seed], axis=0)
    means = means[np.isfinite(means)]
    if means.size == 0:
        return [float("nan"), float("nan")]
    a = (1 - level) / 2
    return [float(np.quantile(means, a)), float(np.quantile(means, 1 - a))]


def summarise_method(
    per_seed: Sequence[dict[str, float]], y_true: np.ndarray, probs_per_seed: Sequence[np.ndarray], task: str,
) -> dict[str, dict]:
    """``{metric: {"mean", "sd", "n"[, "ci95"]}}`` for one method on one split, over seeds."""
    out: dict[str, dict] = {}
    for m in per_seed[0]:
        out[m] = mean_sd([r[m] for r in per_seed])
        if m in CI_METRICS:
            out[m]["ci95"] = seed_mean_ci(y_true, probs_per_seed, task, m)
    return out


def seed_mean_difference_ci(
    y_a: np.ndarray, probs_a: Sequence[np.ndarray], y_b: np.ndarray, probs_b: Sequence[np.ndarray], task: str, metric: str,
    paired: bool, n_boot: int = N_BOOTSTRAP, seed: int = 0, level: float = 0.95,
) -> list[float]:
    """Bootstrap interval of (seed-mean of A) - (seed-mean of B).

    ``paired``: A and B are scored on the same images (one split), so every resample
    draws the same images for both and the image-to-image variation cancels, as in a
    paired test. Otherwise (e.g. a validation number against a test number) the two
    sets are resampled independently."""
    rng = np.random.default_rng(seed)
    idx_a = stratified_indices(y_a, n_boot, rng)
    idx_b = idx_a if paired else stratified_indices(y_b, n_boot, rng)
    if paired and np.asarray(y_a).shape != np.asarray(y_b).shape:
        raise ValueError("a paired difference needs both arms scored on the same images")
    a = np.mean([resampled_metric(y_a, p, task, metric, idx_a) for p in probs_a], axis=0)
    b = np.mean([resampled_metric(y_b, p, task, metric, idx_b) for p in probs_b], axis=0)
    d = (a - b)[np.isfinite(a - b)]
    if d.size == 0:
        return [float("nan"), float("nan")]
    q = (1 - level) / 2
    return [float(np.quantile(d, q)), float(np.quantile(d, 1 - q))]
