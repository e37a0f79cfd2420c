"""Peak memory at 64^3: ``topocam run`` and a study trial, code trees side by side.

    python benchmarks/memory64.py --work /tmp/mem64 --code before=/path/to/old/tree --code after=.
    python benchmarks/memory64.py --work /tmp/mem64 --code default=. --code halved=. \
        --env halved:TOPOCAM_CHUNK_VOXELS=2097152

Builds (once, into ``--work``) a synthetic 3D set of AdrenalMNIST3D_64's size:
64^3 volumes, 1,188/98/298 train/val/test, stored as uint8 in the MedMNIST npz
layout (what ``adrenalmnist3d_64.npz`` is). Then, for each code tree, in a fresh
process with ``PYTHONPATH`` set to that tree:

* ``run``: ``topocam run`` on it, the small 3D backbone (``--backbone``), one epoch, no tracking;
* ``trial``: ``topocam study run`` of the same data and backbone (warm cache from
  ``run``), random sampler, ``--trials`` trials (the study also logs the CNN and
  Topo-Original baselines and tests its best trial, as every study does).

Prints peak resident memory (the kernel's ``ru_maxrss`` of the process) and wall
time per step and tree, the ratios to the first tree, and whether the trees'
numbers are identical (every metric of ``run``; every trial's value of the study).
Each step's resident memory over time goes to ``<work>/<tree>/<step>.rss.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SPLIT_N = (1188, 98, 298)  # AdrenalMNIST3D's splits

STUDY = """[study]
name = "mem64"
objective = "val_auc"
n_trials = {trials}
samplers = ["random"]
seeds = [0]
replicate_seeds = [0]

[data]
dataset = "{npz}"
size = {size}

[backbone]
arch = "{backbone}"
epochs = {epochs}
batch_size = 32
lr = 0.001
seed = 0

[fixed]
outside = "zero"
bins = 50
betti_backend = "fast"

[space.cam]
fixed = "gradcam"  # Score-CAM at 64^3 costs about 40 s per volume on this CPU
"""


def make_npz(path: Path, size: int, n: tuple[int, int, int]) -> None:
    """The synthetic 3D generator's volumes, quantised to uint8 like MedMNIST's files."""
    if path.exists():
        return
    from topocam.core.data import make_synthetic

    arrays = {}
    for split, k, seed in zip(("train", "val", "test"), n, (0, 1, 2)):
        counts = [2, 2, 2]
        counts[("train", "val", "test").index(split)] = k
        ds = make_synthetic(3, size=size, n=tuple(counts), seed=seed)
        arrays[f"{split}_images"] = np.round(ds.x[split][:, 0] * 255).astype(np.uint8)
        arrays[f"{split}_labels"] = ds.y[split][:, None].astype(np.uint8)
        del ds
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def measure(cmd: list[str], env: dict[str, str], trace: Path) -> dict:
    """Run ``cmd``; its peak RSS (ru_maxrss), wall time and an RSS-over-time trace."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, int]] = []
    hwm = [0]
    done = threading.Event()

    def poll() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while not done.is_set():
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        samples.append((time.perf_counter() - t0, int(line.split()[1]) * 1024))
                    elif line.startswith("VmHWM:"):  # the process's own high-water mark, monotonic
                        hwm[0] = max(hwm[0], int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass
            done.wait(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    poller.join()
    wall = time.perf_counter() - t0
    trace.write_text("seconds,rss_bytes\n" + "".join(f"{t:.1f},{r}\n" for t, r in samples))
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    peak = usage.ru_maxrss * 1024
    if hwm[0] and peak > 1.05 * hwm[0]:  # ru_maxrss can carry this parent's peak over an exec (vfork): say so
        print(f"  ru_maxrss {peak / 1e9:.2f} GB exceeds the process's own VmHWM {hwm[0] / 1e9:.2f} GB (last seen); "
              "the latter is reported", flush=True)
        peak = hwm[0]
    return {"peak_gb": peak / 1e9, "hwm_gb": hwm[0] / 1e9, "wall_s": wall, "output": out}


def trial_values(db: Path) -> list[float]:
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT t.number, v.value FROM trials t JOIN trial_values v ON v.trial_id = t.trial_id ORDER BY t.number"
        ).fetchall()
    return [v for _, v in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the data set, caches and outputs")
    ap.add_argument("--code", action="append", default=[], help="LABEL=DIR of a code tree (repeat; first is the reference)")
    ap.add_argument("--env", action="append", default=[],
                    help="LABEL:NAME=VALUE, an environment variable for one tree's processes (repeat), e.g. a halved "
                         "TOPOCAM_CHUNK_VOXELS")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", default=",".join(map(str, SPLIT_N)), help="train,val,test volumes")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--backbone", default="small", help="small (what a CPU trains at 64^3 in minutes per epoch) or r3d18 (on a GPU)")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--steps", default="run,trial")
    ap.add_argument("--earlier", action="append", default=[],
                    help="LABEL of a tree measured by an earlier invocation: its <work>/LABEL/result.json is reused (first is the reference)")
    ap.add_argument("--make-npz", type=Path, help=argparse.SUPPRESS)  # internal: build the data set and exit
    args = ap.parse_args()
    if args.make_npz:
        make_npz(args.make_npz, args.size, tuple(int(v) for v in args.n.split(",")))
        return
    extra_env: dict[str, dict[str, str]] = {}
    for item in args.env:
        label, _, assignment = item.partition(":")
        name, eq, value = assignment.partition("=")
        if not (label and name and eq):
            sys.exit(f"--env {item!r}: expected LABEL:NAME=VALUE")
        extra_env.setdefault(label, {})[name] = value
    trees = [c.split("=", 1) if "=" in c else (Path(c).resolve().name, c) for c in args.code or ([] if args.earlier else ["this=."])]
    unknown = set(extra_env) - {label for label, _ in trees}
    if unknown:
        sys.exit(f"--env names {', '.join(sorted(unknown))}, which no --code LABEL=DIR gives")
    n = tuple(int(v) for v in args.n.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    npz = (args.work / f"synthetic3d_{args.size}_{'_'.join(map(str, n))}.npz").resolve()
    t0 = time.perf_counter()
    if not npz.exists():  # in a child process: this one's own peak must stay small (see measure)
        subprocess.run([sys.executable, __file__, "--make-npz", str(npz), "--size", str(args.size), "--n", args.n,
                        "--work", str(args.work)], check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    print(f"data: {npz} ({npz.stat().st_size / 1e6:.0f} MB, {sum(n)} volumes of {args.size}^3; {time.perf_counter() - t0:.0f} s)")
    steps = args.steps.split(",")
    results: dict[str, dict[str, dict]] = {}
    for label in args.earlier:  # peak memory does not depend on load; wall times do: say so when comparing
        results[label] = json.loads((args.work / label / "result.json").read_text())
        print(f"{label}: reused from {args.work / label / 'result.json'} (an earlier invocation: wall times not side by side)")
    trees = [(label, None) for label in args.earlier] + trees
    for label, tree in trees:
        if tree is None:
            continue
        tree = str(Path(tree).resolve())
        out = args.work / label
        out.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONPATH": tree, "TOPOCAM_CACHE_DIR": str(out / "cache"), "TOPOCAM_OFFLINE": "1",
               **extra_env.get(label, {})}
        earlier = out / "result.json"  # steps not run now keep their earlier measurement
        results[label] = json.loads(earlier.read_text()) if earlier.exists() and set(steps) != {"run", "trial"} else {}
        if "run" in steps:
            cmd = [sys.executable, f"{tree}/cli.py", "run", "--dataset", str(npz), "--size", str(args.size), "--backbone", args.backbone,
                   "--epochs", str(args.epochs), "--out", str(out / "run"), "--no-tracking", "--quiet"]
            r = measure(cmd, env, out / "run.rss.csv")
            r["metrics"] = json.loads((out / "run" / "metrics.json").read_text())["runs"][0]["metrics"]
            results[label]["run"] = r
            print(f"{label} run: peak {r['peak_gb']:.2f} GB, {r['wall_s']:.0f} s", flush=True)
        if "trial" in steps:
            study = out / "mem64.toml"
            study.write_text(STUDY.format(trials=args.trials, npz=npz, size=args.size, epochs=args.epochs, backbone=args.backbone))
            (out / "optuna.db").unlink(missing_ok=True)
            cmd = [sys.executable, f"{tree}/cli.py", "study", "run", str(study), "--storage", f"sqlite:///{out / 'optuna.db'}",
                   "--runs-dir", str(out / "mlruns"), "--quiet"]
            r = measure(cmd, env, out / "trial.rss.csv")
            r["values"] = trial_values(out / "optuna.db")
            results[label]["trial"] = r
            print(f"{label} trial: peak {r['peak_gb']:.2f} GB, {r['wall_s']:.0f} s, values {r['values']}", flush=True)
        (out / "result.json").write_text(json.dumps({s: {k: v for k, v in r.items() if k != "output"} for s, r in results[label].items()}))
    ref = trees[0][0]
    print(f"\n| tree | step | peak RSS (GB) | x {ref} | wall (s) | x {ref} | numbers identical to {ref} |")
    print("|---|---|---|---|---|---|---|")
    for label, _ in trees:
        for step, r in results[label].items():
            base = results[ref][step]
            same = r.get("metrics", r.get("values")) == base.get("metrics", base.get("values"))
            print(f"| {label} | {step} | {r['peak_gb']:.2f} | {r['peak_gb'] / base['peak_gb']:.2f} | {r['wall_s']:.0f} | "
                  f"{r['wall_s'] / base['wall_s']:.2f} | {'yes' if same else 'NO'} |")
    (args.work / "memory64.json").write_text(json.dumps(
        {label: {s: {k: v for k, v in r.items() if k != "output"} for s, r in res.items()} for label, res in results.items()},
        indent=1))


if __name__ == "__main__":
    main()
