"""Standard optimisation test functions with their usual search boxes, shared by
``benchmarks/de_vs_scipy.py`` and ``tests/test_de_sampler.py`` (minimum 0 in each)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import rosen


def sphere(x) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.sum(x * x))


def rosenbrock(x) -> float:
    return float(rosen(np.asarray(x, dtype=float)))


def ackley(x) -> float:
    x = np.asarray(x, dtype=float)
    d = len(x)
    return float(
        -20.0 * np.exp(-0.2 * np.sqrt(np.sum(x * x) / d))
        - np.exp(np.sum(np.cos(2.0 * np.pi * x)) / d)
        + 20.0
        + np.e
    )


FUNCTIONS = {
    "sphere": (sphere, (-5.12, 5.12)),
    "rosenbrock": (rosenbrock, (-5.0, 10.0)),
    "ackley": (ackley, (-32.768, 32.768)),
}
