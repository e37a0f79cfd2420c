"""One n_jobs convention (-1 all cores, N >= 1 N threads; 0 and < -1 refused)
in the config, the pipeline's resolution and the fast Betti backend."""

import os

import numpy as np
import pytest

from topocam.core.errors import TopoCAMError
from topocam.core.jobs import check_n_jobs, resolve_n_jobs
from topocam.core.pipeline import TopoCAMConfig
from topocam.core.topology import betti_curves


def test_resolution():
    assert resolve_n_jobs(-1) == (os.cpu_count() or 1)
    assert resolve_n_jobs(3) == 3 and resolve_n_jobs(None) == 1
    assert check_n_jobs(1) == 1


@pytest.mark.parametrize("bad", [0, -2, -5, 1.5, True])
def test_every_entry_point_refuses_the_same_values(bad):
    with pytest.raises(TopoCAMError, match=r"--n-jobs must be -1 \(all cores\) or a number of threads >= 1"):
        check_n_jobs(bad, "--n-jobs")
    with pytest.raises(TopoCAMError, match="n_jobs must be -1"):
        TopoCAMConfig(n_jobs=bad).validated()
    if not isinstance(bad, float):
        with pytest.raises(TopoCAMError, match="n_jobs must be -1"):
            betti_curves(np.zeros((2, 3, 3)), np.array([0.0]), backend="fast", n_jobs=bad)
