"""How well does a study objective predict test performance? (issue: validation used once)

Draws random configurations from a study's search space (Optuna's RandomSampler on an
in-memory study, seeded), evaluates each on the study's context (its backbone and CAM
cache) and records the two objectives a study can use, ``val_auc`` (78 images on
BreastMNIST) and ``cv_auc`` (5-fold on the training split), together with test AUC.
Prints Spearman's rank correlation of each objective with test AUC.

Test AUC is computed here ONLY to measure the objectives; nothing computed here feeds
back into any study, and this script never writes to a study's storage.

    python benchmarks/objective_vs_test.py studies/breastmnist.toml --data-dir ../shared/data/medmnist \
        [--n-configs 60] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--n-configs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np
    import optuna
    from scipy.stats import spearmanr
    from tqdm.auto import tqdm

    from topocam.core.pipeline import CV_FOLDS, evaluate, prepare
    from topocam.search.space import apply_params, suggest
    from topocam.search.studyfile import load_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_study(args.study, data_dir=args.data_dir)
    t0 = time.perf_counter()
    ctx = prepare(spec.base, progress=True)
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed), direction="maximize")
    rows = []
    for _ in tqdm(range(args.n_configs), desc="configurations", unit="config"):
        trial = probe.ask()
        params = suggest(trial, spec.space)
        out = evaluate(ctx, apply_params(spec.base, params), report_test=True, cv_folds=CV_FOLDS)
        rows.append({"params": params, "val_auc": out.val["auc"], "cv_auc": out.cv["auc"], "test_auc": out.test["auc"]})
        probe.tell(trial, out.val["auc"])  # an in-memory study: only the sampler's bookkeeping
    test = np.array([r["test_auc"] for r in rows])
    result = {"study": spec.name, "n_configs": len(rows), "seed": args.seed, "seconds": time.perf_counter() - t0, "rows": rows}
    print(f"\n{spec.name}: {len(rows)} random configurations, backbone seed {spec.base.seed}")
    print("| objective | Spearman rho with test AUC | p | objective range |")
    print("|---|---|---|---|")
    for key in ("val_auc", "cv_auc"):
        v = np.array([r[key] for r in rows])
        rho, p = spearmanr(v, test)
        result[f"spearman_{key}"] = {"rho": float(rho), "p": float(p)}
        print(f"| {key} | {rho:.3f} | {p:.2g} | [{v.min():.3f}, {v.max():.3f}] |")
    print(f"test AUC range [{test.min():.3f}, {test.max():.3f}]; {result['seconds']:.0f} s")
    if args.json:
        from topocam.core.atomic import write_json_atomic

        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
