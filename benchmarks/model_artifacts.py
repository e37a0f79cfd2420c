"""A study's model artifacts: their sizes, and the prepare / fetch / verify times.

    python benchmarks/model_artifacts.py STUDY.toml --data-dir DIR --out FOLDER [--seeds 0] [--json out.json] \
        [--tracking-uri http://HOST:5000]

In FOLDER: an SQLite Optuna storage and a local MLflow store (its artifact store a folder: the
upload and download are file copies; with ``--tracking-uri`` an MLflow server's
``mlflow-artifacts:`` proxy, over HTTP), and two caches. A cache entry already in
``FOLDER/cache-prepare`` is uploaded, not rebuilt. ``prepare`` (``StudyRunner.prepare_model`` restricted to
``--seeds``: build in ``FOLDER/cache-prepare`` if empty, upload, download again and
re-verify, record) is timed, then a worker's fetch into the empty ``FOLDER/cache-worker``
(download + digest check), then the same worker again with its cache filled (verify only:
the digests of the local entries). Sizes are per entry, in bytes.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("study", type=Path)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default=None, help="comma-separated model seeds (default: the study's seed and replicate_seeds)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tracking-uri", default=None, help="an MLflow server (default: a local store in FOLDER)")
    args = ap.parse_args()

    from topocam.core.atomic import write_json_atomic
    from topocam.search.artifacts import ModelArtifacts, study_cam_variants
    from topocam.search.runner import StudyRunner
    from topocam.search.studyfile import load_study

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = load_study(args.study, data_dir=args.data_dir)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(dict.fromkeys([spec.base.seed, *spec.replicate_seeds]))
    storage, tracking = f"sqlite:///{out / 'optuna.db'}", args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    runner = StudyRunner.open(spec, storage, tracking, out, progress=False)
    result: dict = {"study": spec.name, "seeds": seeds, "variants": list(study_cam_variants(spec)), "per_seed": {}}
    for seed in seeds:
        cfg = replace(spec.base, seed=seed, cache_dir=str(out / "cache-prepare"))
        runner.timings_s.clear()
        t0 = time.perf_counter()
        runner._prepare(cfg, f"{spec.name}, seed {seed}", publish=True)
        prep = {"total_s": time.perf_counter() - t0, **runner.timings_s}
        model = runner.models[seed]
        row = {"how": model.how, "prepare": prep, "bytes": {e: model.artifacts[e].bytes for e in model.entries.all}}
        for label in ("fetch_empty_cache", "verify_filled_cache"):
            arts = ModelArtifacts(spec.name, storage, runner.storage, runner.tracker, print)
            t0 = time.perf_counter()
            got = arts.ensure(replace(cfg, cache_dir=str(out / "cache-worker")), runner.data, study_cam_variants(spec),
                              lambda full: False, publish=False)
            row[label] = {"total_s": time.perf_counter() - t0, "how": got.how, **arts.timings_s}
        row["total_bytes"] = sum(row["bytes"].values())
        result["per_seed"][seed] = row
        print(json.dumps({seed: row}, indent=1), flush=True)
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
