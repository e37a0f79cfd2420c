"""A study trial's feature stage (fuse + threshold + Betti curves, train and val) on
a context of random CAMs, for code trees side by side:

    python benchmarks/trial_features.py --code before=/path/to/old/tree --code after=. [--size 28] [--n 1188,98]

Each tree runs in its own process (``PYTHONPATH`` = the tree), alternating, ``--repeats``
times: seconds per trial (the median after a warm-up trial, which fills the
upsampled-map cache and compiles numba) and peak RSS. AdrenalMNIST3D's train and val
sizes by default; no backbone is needed (the CAM cache holds random maps), so it
isolates what chunking costs or saves. The features of all trees must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import hashlib, json, resource, sys, tempfile, time
import numpy as np
from topocam.core import pipeline
from topocam.core.cache import CamStore
from topocam.core.cam import CamBatch
from topocam.core.data import make_synthetic
size, n_train, n_val, trials = (int(v) for v in sys.argv[1:5])
data = make_synthetic(3, size=size, n=(n_train, n_val, 2), seed=0, clutter=1)
native = {"layer2": size // 2, "layer3": size // 4, "layer4": size // 8}
rng = np.random.default_rng(0)
store = CamStore(tempfile.mkdtemp(), "k")
store.save("gradcam", {s: CamBatch({l: rng.random((len(data.y[s]),) + (k,) * 3, dtype=np.float32) for l, k in native.items()},
                                   np.zeros(len(data.y[s]), np.int64), np.full((len(data.y[s]), 2), 0.5, np.float32))
                       for s in ("train", "val", "test")})
cfg = pipeline.TopoCAMConfig(dataset="synthetic3d", size=size, backbone="small", bins=50, n_jobs=-1, tau=0.6)
ctx = pipeline.Context(cfg, data, None, None, {}, store, progress=False)
times, digest = [], None
for i in range(trials + 1):
    t0 = time.perf_counter()
    feats = pipeline.topocam_features(ctx, cfg)
    if i:
        times.append(time.perf_counter() - t0)
    digest = hashlib.sha256(b"".join(feats.x[s].tobytes() for s in ("train", "val"))).hexdigest()[:16]
print(json.dumps({"median_s": float(np.median(times)), "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "features": digest}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--code", action="append", required=True, help="LABEL=DIR (repeat; the first is the reference)")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--n", default="1188,98", help="train,val volumes")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    trees = [c.split("=", 1) for c in args.code]
    n_train, n_val = args.n.split(",")
    out: dict[str, list[dict]] = {label: [] for label, _ in trees}
    for _ in range(args.repeats):
        for label, tree in trees:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
            r = subprocess.run([sys.executable, "-c", CHILD, str(args.size), n_train, n_val, str(args.trials)],
                               env=env, capture_output=True, text=True, check=True)
            out[label].append(json.loads(r.stdout.strip().splitlines()[-1]))
    ref = trees[0][0]
    best = {label: min(r["median_s"] for r in rs) for label, rs in out.items()}
    print(f"{args.size}^3, {n_train} + {n_val} volumes, best of {args.repeats} processes x median of {args.trials} trials")
    print(f"| tree | s per trial | x {ref} | peak RSS (GB) | features identical to {ref} |")
    print("|---|---|---|---|---|")
    for label, rs in out.items():
        same = {r["features"] for r in rs} == {r["features"] for r in out[ref]}
        print(f"| {label} | {best[label]:.2f} | {best[label] / best[ref]:.2f} | {max(r['peak_gb'] for r in rs):.2f} | "
              f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
