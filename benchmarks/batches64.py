"""Peak memory of each backbone stage at 64^3, one fresh process per stage and batch.

    python benchmarks/batches64.py [--batches 128,16,8] [--volumes 2]

Where ``memory64.py`` runs ``topocam run`` end to end (about an hour of CPU at 64^3 on the
2-core machine), this measures in minutes what the inference / recalibration batch
(``infer_batch``, ``bn_batch``; default 16 at 64^3, 128 before they were settings) bounds:
BatchNorm recalibration, CNN inference and Grad-CAM, each over ``--volumes`` batches of
random 64^3 volumes with the small 3D CNN, and one training step at the recipe's batch 32
in micro-batches of the smaller of 32 and the setting (``micro_batch``: 16 at 64^3 by
default, 32 before it was a setting). Prints peak resident memory (``ru_maxrss``) per stage
and batch; the process's baseline (torch imported, model built) is printed too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STAGE = r"""
import json, resource, sys
sys.path.insert(0, {repo!r})
import numpy as np, torch
from topocam.core.backbone import batch_gradients, build_backbone, predict_proba, recalibrate_batchnorm
from topocam.core.cam import compute_cams
stage, batch, volumes = {stage!r}, {batch}, {volumes}
torch.manual_seed(0)
model, _ = build_backbone("small", 3, 2, 64, init="scratch")
n = 32 if stage == "train" else batch * volumes
from topocam.core.data import Images
x = Images(np.random.default_rng(0).integers(0, 256, (n, 1, 64, 64, 64), dtype=np.uint8), 255.0)  # as MedMNIST uint8 is held
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if stage == "train":  # one optimizer step of the recipe's batch 32, in micro-batches of `batch`
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    batch_gradients(model, torch.nn.CrossEntropyLoss(), x, np.zeros(32, dtype=np.int64), torch.arange(32), batch,
                    torch.device("cpu"))
    opt.step()
elif stage == "recalibrate":
    recalibrate_batchnorm(model, x, batch_size=batch)
elif stage == "infer":
    predict_proba(model, x, batch_size=batch)
elif stage == "gradcam":
    compute_cams(model, x, "gradcam", batch_size=min(64, batch))
print(json.dumps({{"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "before_gb": base * 1024 / 1e9}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="128,16,8")
    ap.add_argument("--volumes", type=int, default=2, help="batches per stage (the volumes are batch x this)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the table")
    args = ap.parse_args()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for stage in ("train", "recalibrate", "infer", "gradcam"):
            # training: the recipe's batch 32 in micro-batches of min(32, setting); CAMs at min(64, setting)
            given = min(32, batch) if stage == "train" else batch
            r = subprocess.run([sys.executable, "-c", STAGE.format(repo=str(REPO), stage=stage, batch=given, volumes=args.volumes)],
                               capture_output=True, text=True, check=True)
            rows.append({"stage": "train step (batch 32)" if stage == "train" else stage,
                         "batch": min(64, batch) if stage == "gradcam" else given, "setting": batch, **json.loads(r.stdout)})
            print(rows[-1], flush=True)
    print("\n| stage | batch | peak RSS (GB) | of which before the stage (data, model) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['batch']} | {r['peak_gb']:.2f} | {r['before_gb']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
