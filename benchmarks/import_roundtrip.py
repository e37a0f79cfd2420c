"""Round trip of `topocam data import` on AdrenalMNIST3D (issue 21).

Writes every volume of adrenalmnist3d.npz as NIfTI under FOLDER (train and val in
RAS; the test split in mixed orientations: RAS, LPS, permuted and flipped axes),
a labels CSV with the original split column, runs the import, and checks the
imported arrays equal the npz arrays (max |Δ| per split) and prints the time.

    nice python benchmarks/import_roundtrip.py /tmp/adrenal_nifti [--npz PATH]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

NPZ = Path("/work/shared/data/medmnist/adrenalmnist3d.npz")
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
PERM = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])  # stored (k, i, j), i flipped
ORIENTATIONS = [(np.eye(4), lambda v: v), (LPS, lambda v: v[::-1, ::-1, :]), (PERM, lambda v: np.transpose(v, (1, 2, 0))[::-1])]


def write(npz: Path, folder: Path) -> Path:
    src = folder / "scans"
    src.mkdir(parents=True, exist_ok=False)
    rows = []
    with np.load(npz) as z:
        for split in ("train", "val", "test"):
            for i, (v, y) in enumerate(zip(z[f"{split}_images"], z[f"{split}_labels"][:, 0])):
                aff, store = ORIENTATIONS[i % 3] if split == "test" else ORIENTATIONS[0]
                name = f"{split}_{i:04d}.nii.gz"
                nib.save(nib.Nifti1Image(np.ascontiguousarray(store(v)), aff), str(src / name))
                rows.append({"file": name, "label": int(y), "split": split})
    labels = folder / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["file", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    return labels


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--npz", type=Path, default=NPZ)
    a = ap.parse_args()
    t0 = time.perf_counter()
    labels = write(a.npz, a.folder)
    t1 = time.perf_counter()
    out = a.folder / "dataset"
    cmd = [sys.executable, "-c", "from topocam.cli import main; main()", "data", "import", str(a.folder / "scans"), "--labels", str(labels), "--out", str(out), "--size", "28", "--quiet"]
    rc = subprocess.call(cmd)
    t2 = time.perf_counter()
    print(f"wrote NIfTI in {t1 - t0:.1f} s; import (exit {rc}) in {t2 - t1:.1f} s")
    worst = 0
    with np.load(a.npz) as ref, np.load(out / "data.npz") as got:
        for split in ("train", "val", "test"):
            x, y = ref[f"{split}_images"].astype(int), got[f"{split}_images"].astype(int)
            d = int(np.abs(x - y).max()) if x.shape == y.shape else -1
            same = np.array_equal(ref[f"{split}_labels"], got[f"{split}_labels"])
            print(f"{split}: n={len(x)} max|Δ|={d} labels equal={same}")
            worst = max(worst, d if d >= 0 and same else 999)
    return 0 if rc == 0 and worst == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
