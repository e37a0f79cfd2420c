"""One convention for ``n_jobs`` everywhere (the CLI's ``--n-jobs``, a study
file's ``[fixed] n_jobs``, ``TopoCAMConfig.n_jobs``, the Betti backends):
-1 means all cores, N >= 1 means N threads; 0 and values below -1 are errors."""

from __future__ import annotations

import numbers
import os

from .errors import TopoCAMError


def check_n_jobs(n_jobs: int, what: str = "n_jobs") -> int:
    """``n_jobs`` as an int, or a TopoCAMError naming ``what`` (the option at fault)."""
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, numbers.Integral) or not (n_jobs == -1 or n_jobs >= 1):
        raise TopoCAMError(f"{what} must be -1 (all cores) or a number of threads >= 1, got {n_jobs!r}")
    return int(n_jobs)


def resolve_n_jobs(n_jobs: int | None, what: str = "n_jobs") -> int:
    """The number of threads to use: None -> 1, -1 -> every core, N -> N."""
    if n_jobs is None:
        return 1
    n_jobs = check_n_jobs(n_jobs, what)
    return (os.cpu_count() or 1) if n_jobs == -1 else n_jobs
