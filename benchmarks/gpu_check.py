"""The checks that need a GPU, as one prepared script (issue 22): run it whenever a GPU is at hand.

    python benchmarks/gpu_check.py --out gpu_check.json --data-dir ../shared/data/medmnist
    python benchmarks/gpu_check.py --device cpu --smoke --out /tmp/gpu_smoke.json   # the script itself, on a CPU

Writes one JSON file (after every section, so a run cut short keeps what it measured):

* ``epoch_s``: seconds for one training epoch of ResNet-18 at 64^2 (BreastMNIST's 546 training
  images) and R3D-18 at 64^3 (AdrenalMNIST3D's 1,188), batch 32, on random images of those
  sizes (the time does not depend on the pixel values);
  On CUDA also with ``amp`` (mixed precision, ``*_amp``).
* ``cam_s_per_volume``: Grad-CAM, Grad-CAM++ and Score-CAM seconds per 64^3 volume with R3D-18;
* ``study``: `topocam study compare studies/quickstart.toml --device DEVICE` with a small budget, end to end, its
  wall time and return code;
* ``medmnist_v2``: the MedMNIST v2 preset's ResNet-18 (from scratch, 100 epochs, lr 0.001 / 10 at
  50 and 75, batch 128) on BreastMNIST at 28 px over 5 seeds: test AUC and ACC mean ± sd beside
  their table's 0.901 / 0.863 (the checkpoint is our rule: best validation AUC);
* ``device_vs_cpu``: one backbone (trained on the CPU) run on both devices: max |Δ| of the CNN
  probabilities, of the CAMs, and the share of images whose Betti features are identical, with
  the tolerances they are held to (``tolerance``; ``within_tolerance`` says whether they hold).

``--smoke`` shrinks every size so the script runs in minutes on a CPU (8 on the shared 2 cores; its numbers mean
nothing but that the script works). Each section's failure is recorded and the next one runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from topocam.core.atomic import write_json_atomic  # noqa: E402
from topocam.core.backbone import (  # noqa: E402
    TrainSettings, build_backbone, predict_proba, train_backbone, training_recipe,
)
from topocam.core.cam import compute_cams  # noqa: E402
from topocam.core.data import load_medmnist, make_synthetic  # noqa: E402
from topocam.core.metrics import evaluate  # noqa: E402
from topocam.core.roi import RoiSelector  # noqa: E402
from topocam.core.topology import BettiFeatures, roi_counts  # noqa: E402

TOLERANCE = {"probs": 1e-4, "cam_maps": 1e-3, "features_identical_share": 0.95}
MEDMNIST_V2_BREAST = {"test_auc": 0.901, "test_acc": 0.863, "source": "MedMNIST v2 (Yang et al. 2023), ResNet-18 (28)"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_seconds(arch: str, ndim: int, size: int, n: int, device: torch.device, batch: int = 32, amp: bool = False) -> float:
    """One epoch of forward, backward and Adam steps on random images (after 2 warm-up steps);
    ``amp``: float16 autocast with loss scaling, as ``amp = true`` trains."""
    model, _ = build_backbone(arch, ndim, 2, size, init="scratch")
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch, 1) + (size,) * ndim, generator=gen).to(device)
    y = torch.randint(0, 2, (batch,), generator=gen).to(device)

    scaler = torch.amp.GradScaler("cuda") if amp else None

    def step() -> None:
        opt.zero_grad()
        if scaler is None:
            loss_fn(model(x), y).backward()
            opt.step()
            return
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(2):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range((n + batch - 1) // batch):
        step()
    _sync(device)
    return time.perf_counter() - t0


def cam_seconds(size: int, n: int, device: torch.device, n_score: int) -> dict[str, float]:
    model, _ = build_backbone("r3d18", 3, 2, size, init="scratch")
    model.to(device).eval()
    x = np.random.default_rng(0).random((n, 1, size, size, size), dtype=np.float32)
    out = {}
    for variant, count in (("gradcam", n), ("gradcampp", n), ("scorecam", n_score)):
        compute_cams(model, x[:1], variant, batch_size=1)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        compute_cams(model, x[:count], variant, batch_size=min(count, 16))
        _sync(device)
        out[variant] = (time.perf_counter() - t0) / count
    return out


def small_study(device: torch.device, smoke: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TOPOCAM_CACHE_DIR=str(Path(tmp) / "cache"))
        argv = [sys.executable, str(REPO / "cli.py"), "study", "compare", str(REPO / "studies" / "quickstart.toml"),
                "--device", str(device), "--runs-dir", str(Path(tmp) / "mlruns"), "--samplers", "de,random", "--seeds", "1",
                "--n-trials", "5" if smoke else "25", "--quiet"]
        t0 = time.perf_counter()
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
        return {"command": " ".join(argv[1:]), "returncode": r.returncode, "wall_s": time.perf_counter() - t0,
                "stderr_tail": r.stderr[-1500:]}


def medmnist_v2(data_dir: str, device: torch.device, seeds: list[int], epochs: int | None) -> dict:
    ds = load_medmnist("breastmnist", 28, data_dir)
    recipe = training_recipe("medmnist_v2", epochs=epochs)
    if epochs is not None:
        recipe["milestones"] = tuple(m for m in recipe["milestones"] if m < epochs)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for seed in seeds:
            t0 = time.perf_counter()
            model, info = train_backbone(ds, TrainSettings(arch="resnet18", seed=seed, init="scratch", **recipe),
                                         cache_dir=Path(cache), progress=False, device=device)
            test = evaluate(ds.y["test"], predict_proba(model, ds.x["test"]), ds.task)
            rows.append({"seed": seed, "test_auc": test["auc"], "test_acc": test["acc"], "best_epoch": info.best_epoch,
                         "train_s": time.perf_counter() - t0})
    summary = {k: {"mean": statistics.fmean(r[k] for r in rows), "sd": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0}
               for k in ("test_auc", "test_acc")}
    return {"recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()}, "seeds": rows,
            "summary": summary, "reference": MEDMNIST_V2_BREAST}


def device_vs_cpu(device: torch.device, smoke: bool) -> dict:
    ds = make_synthetic(2, 24, (60, 20, 20) if smoke else (120, 40, 40), seed=0)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as cache:
        model, _ = train_backbone(ds, TrainSettings(arch="small", epochs=2, batch_size=16, seed=0), cache_dir=Path(cache),
                                  progress=False, device=cpu)
    x = ds.x["test"]
    selector = RoiSelector("gradcam", (0.2, 0.3, 0.5), 0.5, "absolute", "zero")
    result = {}
    for name, dev in (("cpu", cpu), ("device", device)):
        model.to(dev)
        probs = predict_proba(model, x, device=dev)
        cams = compute_cams(model, x, "gradcam")
        _, masks = selector.from_maps(cams.maps, ds.shape)
        filtrations = selector.segment(x[:, 0], masks)
        result[name] = (probs, cams.maps, filtrations, roi_counts(masks))
    phi = BettiFeatures(bins=30).fit([result["cpu"][2]])
    f_cpu, f_dev = (phi.transform(result[k][2], result[k][3]) for k in ("cpu", "device"))
    out = {
        "device": str(device),
        "probs_max_abs_diff": float(np.abs(result["cpu"][0] - result["device"][0]).max()),
        "cam_maps_max_abs_diff": max(float(np.abs(result["cpu"][1][k] - result["device"][1][k]).max()) for k in result["cpu"][1]),
        "features_identical_share": float(np.mean(np.all(f_cpu == f_dev, axis=1))),
        "tolerance": TOLERANCE,
    }
    out["within_tolerance"] = (out["probs_max_abs_diff"] <= TOLERANCE["probs"] and out["cam_maps_max_abs_diff"] <= TOLERANCE["cam_maps"]
                               and out["features_identical_share"] >= TOLERANCE["features_identical_share"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "medmnist"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check the script on a CPU")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); use --device cpu --smoke to test "
              "the script", file=sys.stderr)
        return 2
    s = args.smoke
    report: dict = {"device": str(device), "smoke": s, "torch": torch.__version__, "cuda": torch.version.cuda,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sections": {}}
    sections = {
        "epoch_s": lambda: {"resnet18_64px_546": epoch_seconds("resnet18", 2, 16 if s else 64, 64 if s else 546, device),
                            "r3d18_64cubed_1188": epoch_seconds("r3d18", 3, 16 if s else 64, 32 if s else 1188, device),
                            **({"resnet18_64px_546_amp": epoch_seconds("resnet18", 2, 64, 546, device, amp=True),
                                "r3d18_64cubed_1188_amp": epoch_seconds("r3d18", 3, 64, 1188, device, amp=True)}
                               if device.type == "cuda" else {})},
        "cam_s_per_volume": lambda: cam_seconds(16 if s else 64, 2 if s else 16, device, 1 if s else 4),
        "study": lambda: small_study(device, s),
        "medmnist_v2": lambda: medmnist_v2(args.data_dir, device, [0, 1] if s else [0, 1, 2, 3, 4], 2 if s else None),
        "device_vs_cpu": lambda: device_vs_cpu(device, s),
    }
    only = [x for x in args.only.split(",") if x]
    for name, fn in sections.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            value, status = fn(), "ok"
        except Exception as exc:  # noqa: BLE001 - recorded, and the next section runs
            value, status = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}, "error"
        report["sections"][name] = {"status": status, "wall_s": time.perf_counter() - t0, "result": value}
        print(f"{name}: {status} in {time.perf_counter() - t0:.1f} s", flush=True)
        write_json_atomic(Path(args.out), report)
    print(f"wrote {args.out}")
    return 0 if all(v["status"] == "ok" for v in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
