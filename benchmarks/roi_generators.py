"""The ROI generators of issue 24 on the synthetic sets: ROI quality against the true lesion
and downstream TopoCAM test AUC, over model seeds, with the paired difference to the
threshold ROI of Grad-CAM; and each generator's cost per image on this machine.

Runs ``studies/ablations/roi.toml`` through the ablation machinery (``search.ablate``:
every arm under every seed on its own backbone, paired bootstrap intervals on the same
test images), with the reference = TopoCAM with the threshold ROI of Grad-CAM.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/roi_generators.py --dims 2,3 --seeds 0,1,2 \\
        --out /tmp/roi-generators > roi_generators.log 2>&1

Cost per image: the CAM pass of the variant (computed afresh for the test split), the
ROI step on test (fuse and threshold; prompt and random walker; the U-Net's inference)
and, for the segmenter, its training time (once per dataset, seed and loss; amortised
over nothing here, reported as is). One thread (OMP_NUM_THREADS=1), niced.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from topocam.core.cam import compute_cams
from topocam.core.data import make_synthetic
from topocam.core.pipeline import roi_for, segmenter_for
from topocam.core.settings import TopoCAMConfig
from topocam.core.stats import format_mean_sd
from topocam.search.ablate import REFERENCE, Ablation, load_suite, summarise

SUITE = Path(__file__).resolve().parents[1] / "studies" / "ablations" / "roi.toml"


def config(ndim: int, args) -> TopoCAMConfig:
    size = args.size2d if ndim == 2 else args.size3d
    n = tuple(int(v) for v in (args.n2d if ndim == 2 else args.n3d).split(","))
    return TopoCAMConfig(dataset=f"synthetic{ndim}d", size=size, synthetic_n=n, backbone="small", epochs=args.epochs,
                         cam="gradcam", bins=args.bins, n_jobs=1, cache_dir=args.cache_dir).validated()


def costs(ab: Ablation, cfg: TopoCAMConfig, arm_cfgs: dict[str, TopoCAMConfig]) -> dict[str, dict[str, float]]:
    """Seconds per test image of each arm's CAM pass and ROI step (first seed's context)."""
    ctx = ab.context(cfg)
    x = np.asarray(ctx.data.x["test"])
    n = len(x)
    out = {}
    for name, c in arm_cfgs.items():
        row: dict[str, float] = {}
        if c.roi != "segmenter":
            t0 = time.perf_counter()
            compute_cams(ctx.model, x, c.cam, rule="predicted")
            row["cam_s_per_image"] = (time.perf_counter() - t0) / n
        else:
            seg = segmenter_for(ctx, c)
            row["train_s"] = float(getattr(seg.info, "train_seconds", float("nan")))
        t0 = time.perf_counter()
        roi_for(ctx, c, "test")
        row["roi_s_per_image"] = (time.perf_counter() - t0) / n
        out[name] = row
    return out


def table(rows: list[dict], cost: dict[str, dict[str, float]], title: str) -> str:
    head = ("| generator | ROI Dice | pointing game | Betti error | TopoCAM test AUC | Δ AUC vs threshold(gradcam) [95 % CI] "
            "| CAM s/img | ROI s/img | segmenter training s |")
    lines = [f"### {title}", "", head, "|" + "---|" * 9]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['arm']} | not run: {r['reason']} |" + " |" * 7)
            continue
        q = r.get("roi_quality", {})
        d = r["delta_auc"]
        lo, hi = d["ci95"]
        delta = "— (reference)" if r["ablation"] == "reference" else f"{d['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]{' *' if d['excludes_zero'] else ''}"
        c = cost.get(r["arm"], {})

        def f(k: str, fmt: str = "{:.4f}") -> str:
            return fmt.format(c[k]) if k in c else "—"

        lines.append(
            f"| {r['arm']} | {format_mean_sd(q.get('dice'))} | {format_mean_sd(q.get('pointing_game'))} | "
            f"{format_mean_sd(q.get('betti_error'))} | {format_mean_sd(r['auc'])} | {delta} | {f('cam_s_per_image')} | "
            f"{f('roi_s_per_image')} | {f('train_s', '{:.1f}')} |"
        )
    return "\n".join(lines)


def per_seed(results, ref) -> list[dict]:
    """(arm, seed, ROI quality, test AUC) of every TopoCAM arm-seed: what the correlations read."""
    out = []
    for r in [ref, *results]:
        for seed, a in sorted(r.seeds.items()):
            if a.roi_quality:
                out.append({"arm": r.arm.name, "seed": seed, "auc": a.test["auc"],
                            **{k: a.roi_quality[k] for k in ("dice", "iou", "pointing_game", "betti_error")}})
    return out


def correlations(points: list[dict]) -> dict[str, dict[str, float]]:
    """Spearman's rho of test AUC with each ROI measure over the arm-seeds (the reference's
    seeds counted once), with its permutation-free p-value from scipy."""
    from scipy.stats import spearmanr

    pts = [p for p in points if p["arm"] != "topocam"]  # the reference equals threshold_gradcam
    auc = [p["auc"] for p in pts]
    return {k: dict(zip(("rho", "p"), map(float, spearmanr([p[k] for p in pts], auc)))) | {"n": len(pts)}
            for k in ("dice", "betti_error", "pointing_game")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", default="2,3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--size2d", type=int, default=24)
    p.add_argument("--size3d", type=int, default=16)
    p.add_argument("--n2d", default="200,60,100", help="synthetic train,val,test counts in 2D")
    p.add_argument("--n3d", default="160,40,80", help="synthetic train,val,test counts in 3D")
    p.add_argument("--epochs", type=int, default=10, help="backbone epochs (the small CNN)")
    p.add_argument("--bins", type=int, default=50)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", type=Path, default=Path("roi-generators"))
    args = p.parse_args()
    warnings.simplefilter("ignore")
    seeds = [int(s) for s in args.seeds.split(",")]
    suite = load_suite(SUITE)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command_args": vars(args) | {"out": str(args.out)}, "datasets": {}}
    for ndim in (int(d) for d in args.dims.split(",")):
        cfg = config(ndim, args)
        ds = make_synthetic(ndim, size=cfg.size, n=cfg.synthetic_n, seed=cfg.data_seed, clutter=cfg.clutter)
        t0 = time.perf_counter()
        ab = Ablation(cfg, seeds, progress=False, log=print, data=ds)
        ref = ab.run_arm(REFERENCE)
        results = [ab.run_arm(a) for a in suite.arms]
        rows = summarise([ref, *results], ref, ds.y, ds.task)
        arm_cfgs = {a.name: replace(ab.arm_config(a)[0], seed=seeds[0]) for a in suite.arms}
        cost = costs(ab, replace(cfg, seed=seeds[0]), arm_cfgs)
        wall = time.perf_counter() - t0
        title = (f"synthetic{ndim}d, size {cfg.size}, n {cfg.synthetic_n}, small CNN {cfg.epochs} epochs, bins {cfg.bins}, "
                 f"seeds {seeds} ({wall / 60:.1f} min; pointing-game chance {ds.lesion_masks['test'].mean():.3f})")
        md = table([r for r in rows if r["ablation"] != "reference"], cost, title)
        pts = per_seed(results, ref)
        corr = correlations(pts)
        md += "\n\nSpearman rho of test AUC with, over the arm-seeds: " + ", ".join(
            f"{k} {c['rho']:+.2f} (p {c['p']:.3f}, n {c['n']})" for k, c in corr.items())
        print(md, flush=True)
        report["datasets"][ds.name] = {"rows": rows, "cost": cost, "wall_s": wall, "config": cfg.as_dict(),
                                       "per_seed": pts, "spearman_auc": corr}
        (args.out / "roi_generators.json").write_text(json.dumps(report, indent=1, default=str))
        with open(args.out / "roi_generators.md", "a") as fh:
            fh.write(md + "\n\n")


if __name__ == "__main__":
    main()
