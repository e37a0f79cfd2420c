"""Samplers ranked over blocks: the Friedman test and Nemenyi's critical difference
(Demšar 2006, as CARP-S and the HPO benchmarking literature report them), and the
verdict words of a paired interval.

A block is one (study, sampler seed): every sampler's best objective at the end of
the budget in that block is ranked, 1 = best (ties share their mean rank). The
Friedman test asks whether the mean ranks differ at all; two samplers differ by
Nemenyi's post-hoc rule when their mean ranks are further apart than

    CD = q_alpha * sqrt(k (k + 1) / (6 N)),   q_alpha = studentized_range.ppf(1 - alpha, k, inf) / sqrt(2)

for k samplers over N blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2, friedmanchisquare, rankdata, studentized_range

ALPHA = 0.05


@dataclass(frozen=True)
class RankTest:
    samplers: list[str]
    mean_ranks: list[float]  # 1 = best
    n_blocks: int
    statistic: float  # Friedman's chi-square
    p_value: float
    cd: float  # Nemenyi's critical difference at ALPHA
    q_alpha: float

    def differs(self, a: str, b: str) -> bool:
        ra, rb = (self.mean_ranks[self.samplers.index(s)] for s in (a, b))
        return abs(ra - rb) > self.cd


def nemenyi_q(k: int, alpha: float = ALPHA) -> float:
    """Nemenyi's q_alpha for k groups (Demšar's table: 2.569 for k = 4 at alpha = 0.05)."""
    return float(studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2))


def critical_difference(k: int, n_blocks: int, alpha: float = ALPHA) -> float:
    return nemenyi_q(k, alpha) * math.sqrt(k * (k + 1) / (6.0 * n_blocks))


def blocks_needed(k: int, gap: float, alpha: float = ALPHA) -> int | None:
    """The fewest blocks N for which a mean-rank gap ``gap`` exceeds the critical difference
    (the gap held fixed): N > q^2 k (k+1) / (6 gap^2). None for no gap."""
    if not gap > 0:
        return None
    return math.floor(nemenyi_q(k, alpha) ** 2 * k * (k + 1) / (6.0 * gap * gap)) + 1


def friedman_nemenyi(values: np.ndarray, samplers: list[str], alpha: float = ALPHA) -> RankTest:
    """``values``: (blocks, samplers), higher is better. The Friedman statistic is scipy's
    (tie-corrected) for three samplers or more; for two, the same statistic computed here."""
    v = np.asarray(values, dtype=float)
    n, k = v.shape
    if k < 2 or n < 2:
        raise ValueError(f"a rank test needs at least 2 samplers and 2 blocks, got {k} and {n}")
    ranks = rankdata(-v, axis=1)
    mean = ranks.mean(axis=0)
    if k >= 3:
        stat, p = friedmanchisquare(*v.T)
    else:
        # Friedman's chi-square with the tie correction scipy uses, for k = 2
        sr = ranks.sum(axis=0)
        ties = sum(((np.unique(r, return_counts=True)[1]) ** 3 - (np.unique(r, return_counts=True)[1])).sum() for r in ranks)
        c = 1 - ties / (n * (k**3 - k))
        stat = (12.0 / (n * k * (k + 1)) * np.sum(sr**2) - 3 * n * (k + 1)) / c if c > 0 else 0.0
        p = float(chi2.sf(stat, k - 1))
    return RankTest(list(samplers), [float(x) for x in mean], n, float(stat), float(p),
                    critical_difference(k, n, alpha), nemenyi_q(k, alpha))


# --------------------------------------------------------------- the verdict rule

SUPPORTED, NOT_SUPPORTED, REVERSED, NO_INTERVAL = "supported", "not supported", "reversed", "no paired interval"


def verdict(interval: tuple[float, float] | list[float] | None) -> str:
    """The words for a claim "A beats B" from the paired 95 % interval of A - B: supported when it
    lies above 0, reversed when below 0, not supported when it includes 0."""
    if interval is None:
        return NO_INTERVAL
    lo, hi = (float(x) if x is not None else math.nan for x in interval)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return NO_INTERVAL
    if lo > 0:
        return SUPPORTED
    if hi < 0:
        return REVERSED
    return NOT_SUPPORTED
