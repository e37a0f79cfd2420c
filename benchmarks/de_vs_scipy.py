"""Best value reached on sphere / Rosenbrock / Ackley (3-D and 6-D) at equal evaluation budgets.

Methods, side by side: our ``DifferentialEvolutionSampler`` in Optuna in both updating modes
(``"deferred"``, its default, the generational variant, and ``"immediate"``), scipy's
``differential_evolution`` in the same two modes (``"immediate"`` is scipy's default;
``polish=False``, ``tol=0`` so it spends the whole budget), Optuna's TPE, CMA-ES
(``optuna.samplers.CmaEsSampler``, skipped with a note when the ``cmaes`` package is missing)
and random search. The budget of a ``d``-dimensional problem is
``15 * d * (generations + 1)`` evaluations, i.e. exactly scipy's ``nfev`` for ``popsize=15`` and
``maxiter=generations``. Each cell is the median over the seeds of the best value reached.

    python benchmarks/de_vs_scipy.py [--generations 5] [--seeds 5] [--workers 2] [--out PATH]
                                     [--methods de_optuna scipy_de ...]

On 2 CPU cores the defaults (270 / 540 evaluations in 3-D / 6-D) take about 50 s on an idle
machine and stayed under 3 minutes on a heavily loaded one. TPE dominates the cost (its time per
trial grows with the history); for the larger budgets where DE is at its best, leave it out, e.g.
``--generations 20 --methods de_optuna de_optuna_immediate scipy_de scipy_de_deferred cmaes random``.
The results are also written as JSON (atomic write: temporary file + ``os.replace``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from benchmarks.functions import FUNCTIONS  # noqa: E402  (after the sys.path line above)

DIMS = (3, 6)
METHODS = ("de_optuna", "de_optuna_immediate", "scipy_de", "scipy_de_deferred", "tpe", "cmaes",
           "random")
LABELS = {
    "de_optuna": "DE (ours)",
    "de_optuna_immediate": "DE (ours, immediate)",
    "scipy_de": "scipy DE",
    "scipy_de_deferred": "scipy DE defer",
    "tpe": "TPE",
    "cmaes": "CMA-ES",
    "random": "Random",
}
# rough relative cost per evaluation, to start the slow jobs first
COST = {"tpe": 20.0, "cmaes": 2.0, "de_optuna": 1.0, "de_optuna_immediate": 1.0, "random": 0.7,
        "scipy_de": 0.05, "scipy_de_deferred": 0.05}


def run_one(task: tuple[str, int, str, int, int]) -> tuple[tuple, float, float]:
    name, dim, method, seed, generations = task
    f, (lo, hi) = FUNCTIONS[name]
    budget = 15 * dim * (generations + 1)
    start = time.perf_counter()
    if method.startswith("scipy_de"):
        from scipy.optimize import differential_evolution

        res = differential_evolution(
            f, [(lo, hi)] * dim, popsize=15, maxiter=generations, polish=False, tol=0, atol=0,
            seed=seed, updating="deferred" if method.endswith("deferred") else "immediate",
        )
        assert res.nfev == budget, (res.nfev, budget)
        best = float(res.fun)
    else:
        import optuna

        from topocam.search.de import DifferentialEvolutionSampler

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        sampler = {
            "de_optuna": lambda: DifferentialEvolutionSampler(seed=seed),
            "de_optuna_immediate": lambda: DifferentialEvolutionSampler(seed=seed, updating="immediate"),
            "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        }[method]()
        study = optuna.create_study(sampler=sampler)
        study.optimize(
            lambda t: f([t.suggest_float(f"x{i}", lo, hi) for i in range(dim)]), n_trials=budget
        )
        best = float(study.best_value)
    return task, best, time.perf_counter() - start


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=5,
                        help="scipy maxiter; budget = 15*d*(generations+1) evaluations")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="subset of methods (TPE is by far the slowest at large budgets)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args(argv)

    methods = [m for m in METHODS if m in args.methods]
    notes = []
    if "cmaes" in methods and importlib.util.find_spec("cmaes") is None:
        methods.remove("cmaes")
        notes.append("CMA-ES skipped: the `cmaes` package is not installed "
                     "(optuna.samplers.CmaEsSampler needs it; `pip install cmaes`).")
        print("note:", notes[-1])

    tasks = [
        (name, dim, method, seed, args.generations)
        for name in FUNCTIONS for dim in DIMS for method in methods for seed in range(args.seeds)
    ]
    tasks.sort(key=lambda t: -COST[t[2]] * t[1] ** 2)
    t0 = time.perf_counter()
    results: dict[tuple, float] = {}
    seconds: dict[str, float] = {m: 0.0 for m in methods}
    if args.workers > 1:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
            outcomes = list(pool.map(run_one, tasks))
    else:
        outcomes = [run_one(t) for t in tasks]
    for task, best, secs in outcomes:
        results[task] = best
        seconds[task[2]] += secs
    wall = time.perf_counter() - t0

    table = {}
    width = max(15, 2 + max(len(LABELS[m]) for m in methods))  # columns fit the longest label
    header = f"{'problem':<14}{'evals':>6}  " + "".join(f"{LABELS[m]:>{width}}" for m in methods)
    print(f"\nmedian best value over {args.seeds} seeds (lower is better)")
    print(header)
    print("-" * len(header))
    for name in FUNCTIONS:
        for dim in DIMS:
            budget = 15 * dim * (args.generations + 1)
            row = {}
            for m in methods:
                values = [results[(name, dim, m, s, args.generations)] for s in range(args.seeds)]
                row[m] = {"median": float(np.median(values)), "values": values}
            table[f"{name}-{dim}d"] = {"evaluations": budget, "methods": row}
            print(f"{f'{name} {dim}d':<14}{budget:>6}  "
                  + "".join(f"{row[m]['median']:>{width}.4g}" for m in methods))
    print("\nCPU seconds per method (all runs): "
          + ", ".join(f"{LABELS[m]} {seconds[m]:.1f}" for m in methods))
    print(f"wall time {wall:.1f} s with {args.workers} worker(s)")

    payload = {
        "description": "median over seeds of the best value reached at equal evaluation budgets",
        "generations": args.generations,
        "popsize_per_dim": 15,
        "seeds": list(range(args.seeds)),
        "methods": {m: LABELS[m] for m in methods},
        "notes": notes,
        "results": table,
        "cpu_seconds": seconds,
        "wall_seconds": wall,
    }
    write_json_atomic(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
