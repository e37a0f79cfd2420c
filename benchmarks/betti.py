"""Betti-curve backends side by side: ``fast`` (topocam.betti_fast) vs the
giotto-tda reference, per volume, single-threaded, on the same inputs.

    python benchmarks/betti.py [--quick] [--json out.json]

Inputs: synthetic volumes shaped like CAM-masked MedMNIST volumes (a smooth
random field in [0, 1], a ~40% ROI mask from a smoothed noise field, the
outside zeroed: the paper's ``outside="zero"``; the ``exclude`` mode is
measured too) at 28^3 and 64^3, plus real AdrenalMNIST3D volumes (28^3) when
``../shared/data/medmnist/adrenalmnist3d.npz`` exists. Thresholds: a 50-bin
``BettiGrid`` fitted on the volumes of the case.

Reported per case: median ms per volume of each backend, the speed-up, whether
the outputs are identical, and the floor (np.load of the volume from disk +
np.sort of its values), for context. The JSON summary (written atomically)
keys the headline numbers on the zero-outside synthetic cases.

Section ``trial`` (needs the AdrenalMNIST3D file; skipped with a message
without it): one full study trial, ``pipeline.evaluate(ctx, cfg,
report_test=False)`` = fuse + threshold + Betti curves + MLP fit on train and
val, at 28^3 with the default configuration, fast backend with n_jobs=-1:
median wall seconds over repetitions (the first call excluded: numba cache
load, page cache, the context's upsampled-map cache), its stages, a few other
configurations (the MLP's epoch count drives the spread), the same trial once
with the giotto-tda backend (``--skip-giotto-trial`` to leave it out; ~2-3
min), and the size of the on-disk CAM cache (all three variants, read
memory-mapped). The context comes from ``topocam.core.pipeline.prepare`` with the
``small`` backbone trained for 1 epoch (cached in ``--cache-dir``, default
``~/.cache/topocam``): a backbone's quality does not change a trial's cost.
First run: ~6 min to train it and minutes per CAM variant on 2 cores, except
Score-CAM (224 masked forward passes per volume; benchmarks/scorecam.py).

    python benchmarks/betti.py --only trial [--skip-giotto-trial] [--cache-dir DIR]

Sections: ``SECTIONS`` maps a name to a function ``(args) -> dict``; each
section's dict is merged into the JSON summary and printed as its own table.
Append a section by adding a function and an entry.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from topocam.core.roi import segment  # noqa: E402

from topocam.core.topology import BettiGrid, betti_curves  # noqa: E402

ADRENAL = ROOT.parent / "shared" / "data" / "medmnist" / "adrenalmnist3d.npz"
N_BINS = 50


# ----------------------------------------------------------------------------- helpers


def time_per_item(fn: Callable[[int], object], n_items: int, repeat: int = 1) -> list[float]:
    """Wall-clock seconds of fn(i) for each item (the best of ``repeat`` runs each)."""
    times = []
    for i in range(n_items):
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(i)
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    return times


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def write_json_atomic(path: Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    print(f"\n{title}")
    for n, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


# ----------------------------------------------------------------------------- inputs


def synthetic_volumes(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n smooth random fields in [0, 1] of shape size^3 and ~40% ROI masks."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, size))
    masks = np.empty((n, size, size, size), dtype=bool)
    for i in range(n):
        f = ndimage.gaussian_filter(rng.standard_normal((size,) * 3), sigma=size / 14)
        images[i] = (f - f.min()) / (f.max() - f.min())
        m = ndimage.gaussian_filter(rng.standard_normal((size,) * 3), sigma=size / 9)
        masks[i] = m > np.quantile(m, 0.6)
    return images, masks


def adrenal_volumes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """The first n AdrenalMNIST3D training volumes in [0, 1] and random-ish ROI
    masks (a smoothed copy above its 60% quantile), or None without the file."""
    if not ADRENAL.exists():
        return None
    from scipy import ndimage

    with np.load(ADRENAL) as data:
        images = data["train_images"][:n].astype(np.float64) / 255.0
    rng = np.random.default_rng(seed)
    masks = np.empty(images.shape, dtype=bool)
    for i in range(len(images)):
        m = ndimage.gaussian_filter(images[i] + 0.5 * rng.random(images[i].shape), sigma=2)
        masks[i] = m > np.quantile(m, 0.6)
    return images, masks


# ----------------------------------------------------------------------------- section: Betti backends


def cold_compile_s() -> float | None:
    """Seconds of the fast backend's first call in a fresh process with an
    empty numba cache (the one-off compile cost; later processes load the
    cache), or None if the subprocess fails."""
    import subprocess

    code = (
        "import time, numpy as np\n"
        "from topocam.betti_fast import betti_curves_fast\n"
        "t0 = time.perf_counter()\n"
        "betti_curves_fast(np.zeros((1, 3, 3, 3)), np.linspace(0, 1, 3))\n"
        "print(time.perf_counter() - t0)\n"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
        try:
            res = subprocess.run(
                [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
            )
            return float(res.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, ValueError, IndexError):
            return None


def measure(filtrations: np.ndarray, thresholds: np.ndarray, n_giotto: int, floor_dir: Path | None = None) -> dict:
    """Median ms per volume of the fast and giotto backends (n_jobs=1, one
    volume per call) on the same inputs; giotto on the first n_giotto
    volumes, fast on all. Identical: the outputs on the giotto volumes agree
    exactly. Floor: np.load of the volume's .npy + np.sort of its values."""
    n = len(filtrations)
    n_giotto = min(n_giotto, n)
    fast_out = np.empty((n, filtrations.ndim - 1, thresholds.size), dtype=np.int64)

    def fast(i: int) -> None:
        fast_out[i] = betti_curves(filtrations[i : i + 1], thresholds, backend="fast", n_jobs=1)[0]

    giotto_out = []

    def giotto(i: int) -> None:
        giotto_out.append(betti_curves(filtrations[i : i + 1], thresholds, backend="giotto", n_jobs=1)[0])

    fast(0)  # warm (compiled / cache loaded already by the caller; page in)
    fast_times = time_per_item(fast, n, repeat=3)
    giotto_times = time_per_item(giotto, n_giotto)
    identical = bool(np.array_equal(np.stack(giotto_out), fast_out[:n_giotto]))
    # batch call with the default n_jobs=1, for the per-volume cost without per-call overhead
    t0 = time.perf_counter()
    batch = betti_curves(filtrations, thresholds, backend="fast", n_jobs=1)
    batch_ms = 1e3 * (time.perf_counter() - t0) / n
    identical = identical and bool(np.array_equal(batch, fast_out))

    floor_times = []
    if floor_dir is not None:
        paths = []
        for i in range(n):
            p = floor_dir / f"vol{i}.npy"
            np.save(p, filtrations[i])
            paths.append(p)

        def floor(i: int) -> None:
            np.sort(np.load(paths[i]).ravel())

        floor_times = time_per_item(floor, n, repeat=3)
    fast_ms, giotto_ms = median_ms(fast_times), median_ms(giotto_times)
    return {
        "n_fast": n,
        "n_giotto": n_giotto,
        "fast_ms": fast_ms,
        "fast_batch_ms": batch_ms,
        "giotto_ms": giotto_ms,
        "speedup": giotto_ms / fast_ms,
        "identical": identical,
        "floor_ms": median_ms(floor_times) if floor_times else None,
    }


def betti_section(args: argparse.Namespace) -> dict:
    quick = args.quick
    plan = [  # (name, size, n volumes for fast, n for giotto)
        ("synthetic", 28, 10 if quick else 40, 5 if quick else 20),
        ("synthetic", 64, 4 if quick else 12, 2 if quick else 5),
    ]
    t0 = time.perf_counter()
    from topocam.core.betti_fast import betti_curves_fast

    betti_curves_fast(np.zeros((1, 3, 3, 3)), np.linspace(0, 1, 3))
    betti_curves_fast(np.zeros((1, 3, 3)), np.linspace(0, 1, 3))
    first_call_s = time.perf_counter() - t0  # numba compile, or load from its cache
    compile_s = None if quick else cold_compile_s()

    cases = []
    inputs = []
    for name, size, n_fast, n_giotto in plan:
        images, masks = synthetic_volumes(n_fast, size, seed=size)
        inputs.append((name, size, images, masks, n_giotto))
    real = adrenal_volumes(10 if quick else 40)
    if real is not None:
        inputs.append(("adrenalmnist3d", 28, real[0], real[1], 5 if quick else 20))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size, images, masks, n_giotto in inputs:
            for outside in ("zero", "exclude"):
                filtrations = segment(images, masks, outside)
                grid = BettiGrid.fit(filtrations, N_BINS)
                res = measure(filtrations, grid.thresholds, n_giotto, floor_dir=Path(tmp))
                res.update(data=name, size=size, outside=outside)
                cases.append(res)
                rows.append(
                    [
                        name,
                        f"{size}^3",
                        outside,
                        f"{res['n_fast']}/{res['n_giotto']}",
                        res["fast_ms"],
                        res["fast_batch_ms"],
                        res["giotto_ms"],
                        f"{res['speedup']:.0f}x",
                        res["floor_ms"],
                        "yes" if res["identical"] else "NO",
                    ]
                )
    print_table(
        f"Betti curves, {N_BINS} thresholds, one thread, median ms per volume"
        f" (fast first call: {first_call_s:.2f} s"
        + (f", cold numba compile: {compile_s:.1f} s)" if compile_s is not None else ")"),
        ["data", "size", "outside", "n fast/giotto", "fast", "fast batch", "giotto", "speed-up", "floor", "identical"],
        rows,
    )

    def pick(size: int) -> dict:
        return next(c for c in cases if c["data"] == "synthetic" and c["size"] == size and c["outside"] == "zero")

    c28, c64 = pick(28), pick(64)
    return {
        "betti_speedup_28": c28["speedup"],
        "betti_speedup_64": c64["speedup"],
        "identical": all(c["identical"] for c in cases),
        "fast_ms_28": c28["fast_ms"],
        "giotto_ms_28": c28["giotto_ms"],
        "fast_ms_64": c64["fast_ms"],
        "giotto_ms_64": c64["giotto_ms"],
        "floor_ms_28": c28["floor_ms"],
        "floor_ms_64": c64["floor_ms"],
        "fast_first_call_s": first_call_s,
        "fast_cold_compile_s": compile_s,
        "betti_cases": cases,
    }


# ----------------------------------------------------------------------------- section: a full trial

TRIAL_CAMS = ("gradcam", "gradcampp", "scorecam")
# (cam, weights, tau) beside the default: the spread of a trial's cost over a study's space
TRIAL_VARIANTS = (
    ("gradcam", (0.6, 0.2, 0.2), 0.3),
    ("gradcam", (0.1, 0.1, 0.8), 0.2),
    ("gradcampp", (0.2, 0.3, 0.5), 0.6),
    ("gradcampp", (1.0, 0.0, 0.0), 0.5),
)
LARGE_ROI = TRIAL_VARIANTS[1]  # ~1/3 of the volume in the ROI with the 1-epoch backbone


def stages(out) -> dict[str, float]:
    """A trial's stages as ``pipeline.evaluate`` times them: fuse + threshold
    (``roi``), Betti features (``betti``: segment, grid fit, curves), MLP fit +
    val metrics (``classifier``)."""
    t = out.timings_s
    return {"fuse_threshold": t["roi"], "betti": t["betti"], "mlp": t["classifier"]}


def timed_trials(ctx, cfg, reps: int) -> tuple[list[float], list[float], dict[str, float], object]:
    """Wall and process-CPU seconds of ``reps`` calls of evaluate (after one
    excluded warm-up call), the median of each stage over those calls, and the
    last outcome."""
    from topocam.core import pipeline

    pipeline.evaluate(ctx, cfg, report_test=False)  # warm-up, excluded
    walls, cpus, runs, out = [], [], [], None
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = pipeline.evaluate(ctx, cfg, report_test=False)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        runs.append(stages(out))
    return walls, cpus, {k: statistics.median(r[k] for r in runs) for k in runs[0]}, out


def trial_section(args: argparse.Namespace) -> dict:
    if not ADRENAL.exists():
        print(f"\ntrial: skipped, {ADRENAL} is absent (put the official adrenalmnist3d.npz there to run it)")
        return {"trial_skipped": f"{ADRENAL} absent"}
    import dataclasses

    from topocam.core import pipeline
    from topocam.core.backbone import default_cache_dir
    from topocam.core.pipeline import TopoCAMConfig

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    base = TopoCAMConfig(
        dataset="adrenalmnist3d", data_dir=str(ADRENAL.parent), backbone="small", epochs=1, cache_dir=str(cache_dir),
        n_jobs=-1,
    )
    t0 = time.perf_counter()
    ctx = pipeline.prepare(base, progress=True)
    prepare_s = time.perf_counter() - t0
    cams = tuple(args.trial_cams or TRIAL_CAMS)
    for variant in cams:  # computed once into the on-disk cache, later runs read it
        if not ctx.store.has(variant):
            note = (
                " -- Score-CAM runs 224 masked forward passes per volume: ~2-4 s per volume on 2 cores,"
                " up to ~2 h in all; --trial-cams gradcam --trial-cams gradcampp leaves it out"
                if variant == "scorecam" else ""
            )
            print(f"computing {variant} CAMs for every split into {ctx.store.root} (once){note}", flush=True)
        ctx.cams(variant, "train")
    cam_s = {v: ctx.timings_s.get(f"cams_{v}") for v in cams}
    cached = [v for v in TRIAL_CAMS if ctx.store.has(v)]
    cache_mb = ctx.store.size_bytes() / 1e6
    per_variant_mb = {v: sum(f.stat().st_size for f in (ctx.store.root / v).rglob("*.npy")) / 1e6 for v in cached}
    memmapped = all(isinstance(ctx.cams(v, "train").maps["layer2"], np.memmap) for v in cached)
    n = {s: int(len(ctx.data.y[s])) for s in ("train", "val", "test")}
    print(
        f"\ntrial context: AdrenalMNIST3D 28^3 ({n['train']}/{n['val']}/{n['test']} volumes), backbone small, 1 epoch"
        f" (val AUC {ctx.backbone.best_val_auc:.3f}; its quality does not change a trial's cost),"
        f" prepare {prepare_s:.1f} s; CAM cache {cache_mb:.1f} MB on disk for {', '.join(cached)}"
        f" ({', '.join(f'{v} {mb:.1f}' for v, mb in per_variant_mb.items())} MB)"
        f" ({'memory-mapped' if memmapped else 'NOT memory-mapped'}) in {ctx.store.root}"
    )

    reps = 3 if args.quick else 7
    cold_t0 = time.perf_counter()
    first = pipeline.evaluate(ctx, base, report_test=False)  # upsampled-map cache fill, numba cache load
    first_s = time.perf_counter() - cold_t0
    walls, cpus, stage_s, out = timed_trials(ctx, base, reps)
    trial_s = statistics.median(walls)
    rows = [[
        "fast (default cfg)", base.cam, f"{base.tau}", f"{out.features.roi_fraction['train']:.3f}",
        len(out.model.history), f"{out.val['auc']:.3f}", trial_s, statistics.median(cpus),
        stage_s["fuse_threshold"], stage_s["betti"], stage_s["mlp"],
    ]]

    by_config = []
    for cam, w, tau in TRIAL_VARIANTS:
        if cam not in cached:
            continue
        cfg = dataclasses.replace(base, cam=cam, weights=w, tau=tau)
        cw, cc, st, o = timed_trials(ctx, cfg, 1 if args.quick else 3)
        by_config.append({
            "cam": cam, "weights": list(w), "tau": tau, "seconds": statistics.median(cw), "cpu_seconds": statistics.median(cc),
            "stages": st, "mlp_epochs": len(o.model.history), "roi_fraction_train": o.features.roi_fraction["train"],
            "val_auc": o.val["auc"],
        })
        rows.append([
            "fast", cam, f"{tau} w={'/'.join(f'{x:g}' for x in w)}", f"{o.features.roi_fraction['train']:.3f}",
            len(o.model.history), f"{o.val['auc']:.3f}", statistics.median(cw), statistics.median(cc),
            st["fuse_threshold"], st["betti"], st["mlp"],
        ])

    giotto_s = giotto_stages = giotto_large = None
    giotto_identical = None
    if args.skip_giotto_trial:
        print("giotto trial: skipped (--skip-giotto-trial)")
    else:
        gcfg = dataclasses.replace(base, betti_backend="giotto")
        print("giotto trial: one repetition (slow) ...", flush=True)
        t0 = time.perf_counter()
        gout = pipeline.evaluate(ctx, gcfg, report_test=False)
        giotto_s = time.perf_counter() - t0
        giotto_stages = {"features": gout.timings_s["features"], "mlp": gout.timings_s["classifier"]}
        giotto_identical = bool(
            all(np.array_equal(gout.features.x[s], out.features.x[s]) for s in ("train", "val")) and gout.val == out.val
        )
        rows.append([
            "giotto (default cfg)", base.cam, f"{base.tau}", f"{gout.features.roi_fraction['train']:.3f}",
            len(gout.model.history), f"{gout.val['auc']:.3f}", giotto_s, None, None, gout.timings_s["features"],
            gout.timings_s["classifier"],
        ])
        # the default tau leaves a tiny ROI here, and giotto's cost grows with it: one large-ROI trial too
        cam, w, tau = LARGE_ROI
        lcfg = dataclasses.replace(base, cam=cam, weights=w, tau=tau)
        fast_large = next((c for c in by_config if (c["cam"], tuple(c["weights"]), c["tau"]) == LARGE_ROI), None)
        print("giotto trial, large ROI: one repetition (slow) ...", flush=True)
        lfast = pipeline.evaluate(ctx, lcfg, report_test=False)
        t0 = time.perf_counter()
        lout = pipeline.evaluate(ctx, dataclasses.replace(lcfg, betti_backend="giotto"), report_test=False)
        giotto_large = {
            "cam": cam, "weights": list(w), "tau": tau, "seconds": time.perf_counter() - t0,
            "features": lout.timings_s["features"], "mlp": lout.timings_s["classifier"],
            "roi_fraction_train": lout.features.roi_fraction["train"],
            "fast_seconds": None if fast_large is None else fast_large["seconds"],
        }
        giotto_identical = giotto_identical and bool(
            all(np.array_equal(lout.features.x[s], lfast.features.x[s]) for s in ("train", "val")) and lout.val == lfast.val
        )
        rows.append([
            "giotto", cam, f"{tau} w={'/'.join(f'{x:g}' for x in w)}", f"{lout.features.roi_fraction['train']:.3f}",
            len(lout.model.history), f"{lout.val['auc']:.3f}", giotto_large["seconds"], None, None,
            lout.timings_s["features"], lout.timings_s["classifier"],
        ])
    rows = [["-" if c is None else c for c in r] for r in rows]
    print_table(
        f"One trial (evaluate, train+val) on AdrenalMNIST3D 28^3, {os.cpu_count()} cores, n_jobs=-1;"
        f" fast: median of {reps} after one excluded warm-up (first call {first_s:.2f} s), seconds"
        + ("" if giotto_identical is None else "; giotto features and metrics identical to fast: " + ("yes" if giotto_identical else "NO"))
        + " (giotto 'betti' column: fuse+threshold+Betti)",
        ["backend", "cam", "tau", "roi frac", "mlp epochs", "val auc", "wall", "cpu", "fuse+thr", "betti", "mlp"],
        rows,
    )
    return {
        "trial_seconds_adrenal28": trial_s,
        "giotto_trial_seconds_adrenal28": giotto_s,
        "trial_speedup_adrenal28": None if giotto_s is None else giotto_s / trial_s,
        "trial_first_call_seconds_adrenal28": first_s,
        "trial_cpu_seconds_adrenal28": statistics.median(cpus),
        "trial_repeats_seconds_adrenal28": walls,
        "trial_stages_adrenal28": stage_s,
        "giotto_trial_stages_adrenal28": giotto_stages,
        "giotto_trial_large_roi_adrenal28": giotto_large,
        "trial_giotto_identical": giotto_identical,
        "trial_mlp_epochs_adrenal28": len(out.model.history),
        "trial_val_auc_adrenal28": out.val["auc"],
        "trial_roi_fraction_adrenal28": out.features.roi_fraction["train"],
        "trial_by_config_adrenal28": by_config,
        "trial_backbone": {
            "arch": "small", "epochs": 1, "best_val_auc": ctx.backbone.best_val_auc, "cached": ctx.backbone.cached,
        },
        "trial_prepare_seconds": prepare_s,
        "cam_seconds_adrenal28": cam_s,
        "cam_cache_mb_adrenal28": cache_mb,
        "cam_cache_variants": cached,
        "cam_cache_mb_per_variant_adrenal28": per_variant_mb,
        "cam_cache_memory_mapped": memmapped,
        "cam_cache_dir": str(ctx.store.root),
        "trial_first_outcome_matches": bool(first.val == out.val),
    }


# ----------------------------------------------------------------------------- main

SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "betti": betti_section,
    "trial": trial_section,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer volumes (a smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here (atomically)")
    parser.add_argument(
        "--only", choices=sorted(SECTIONS), action="append", default=None, help="run only this section (repeatable)"
    )
    parser.add_argument("--skip-giotto-trial", action="store_true", help="trial section: leave out the giotto-tda trial")
    parser.add_argument(
        "--cache-dir", default=None, help="trial section: backbone and CAM cache (default $TOPOCAM_CACHE_DIR or ~/.cache/topocam)"
    )
    parser.add_argument(
        "--trial-cams", choices=TRIAL_CAMS, action="append", default=None,
        help="trial section: CAM variants to compute into the cache (repeatable; default all three)",
    )
    args = parser.parse_args(argv)
    summary: dict = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "quick": bool(args.quick),
    }
    t0 = time.perf_counter()
    for name, section in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        summary.update(section(args))
    summary["machine"]["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    summary["wall_s"] = time.perf_counter() - t0
    print(f"\nwall {summary['wall_s']:.1f} s")
    if args.json is not None:
        write_json_atomic(args.json, summary)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
