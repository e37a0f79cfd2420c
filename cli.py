"""topocam: the command-line interface (thin: parse, call topocam, print)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="TopoCAM: Betti curves of CAM-selected regions, studies and baselines.")
console = Console()
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """TopoCAM: Betti curves of CAM-selected regions, studies and baselines."""


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"{what} must be comma-separated numbers, got {text!r}")


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"{what} must be comma-separated integers, got {text!r}")


def ensure_writable_dir(path: Path) -> None:
    """Fail before any work if results could not be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        fail(f"cannot write to output folder {path} ({exc.strerror or exc}); choose another --out")


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def _fmt(v: float | None) -> str:
    return "—" if v is None or v != v else f"{v:.3f}"


def metrics_table(result: dict) -> Table:
    t = Table(title=f"{result['dataset']['name']}: validation and test metrics", title_justify="left")
    t.add_column("method", no_wrap=True)
    cols = [("val", "auc"), ("val", "acc"), ("test", "auc"), ("test", "acc"), ("test", "sensitivity"), ("test", "specificity"), ("test", "f1")]
    short = {"auc": "AUC", "acc": "ACC", "sensitivity": "sens", "specificity": "spec", "f1": "F1"}
    for split, m in cols:
        t.add_column(f"{split}\n{short[m]}", justify="right", no_wrap=True)
    rows = [("TopoCAM", result), ("CNN", result["baselines"]["cnn"]), ("Topo-Original", result["baselines"]["topo_original"])]
    for name, r in rows:
        t.add_row(name, *[_fmt(r[split][m]) for split, m in cols])
    return t


@app.command()
def run(
    dataset: str = typer.Option("breastmnist", help="MedMNIST name, synthetic2d, synthetic3d, or path to an .npz"),
    out: Path = typer.Option(..., "--out", help="folder for metrics.json"),
    data_dir: Optional[Path] = typer.Option(None, help="folder holding MedMNIST .npz files (or TOPOCAM_DATA_DIR)"),
    size: int = typer.Option(28, help="image size (MedMNIST: 28/64/128/224; synthetic: any >= 12)"),
    synthetic_n: str = typer.Option("120,40,40", help="synthetic train,val,test counts"),
    backbone: str = typer.Option("auto", help="auto (resnet18 in 2D, r3d18 in 3D), resnet18, r3d18 or small"),
    epochs: int = typer.Option(10, help="backbone fine-tuning epochs"),
    batch_size: int = typer.Option(32, help="backbone batch size"),
    lr: float = typer.Option(1e-3, help="backbone learning rate (Adam)"),
    cam: str = typer.Option("gradcam", help="gradcam, gradcampp or scorecam"),
    weights: str = typer.Option("0.2,0.3,0.5", help="fusion weights of layer2,layer3,layer4 (normalised to sum 1)"),
    tau: float = typer.Option(0.6, help="ROI threshold on the fused map, in [0, 1]"),
    outside: str = typer.Option("zero", help="zero: outside voxels are 0 (paper); exclude: they never enter the filtration"),
    bins: int = typer.Option(50, help="number of Betti-curve thresholds"),
    betti_backend: str = typer.Option("fast", help="fast (exact, default) or giotto (reference)"),
    mlp: str = typer.Option("128,64", help="MLP hidden sizes"),
    seed: int = typer.Option(0, help="seed for data generation, training and the MLP"),
    cache_dir: Optional[Path] = typer.Option(None, help="checkpoint and CAM cache (or TOPOCAM_CACHE_DIR; default ~/.cache/topocam)"),
    leakage_audit: bool = typer.Option(False, "--leakage-audit", help="ablation ONLY: CAMs target the true label (leaks labels)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Run TopoCAM once and compare it with the CNN and Topo-Original baselines."""
    from topocam import TopoCAMError
    from topocam.pipeline import TopoCAMConfig, run as run_pipeline

    n = _ints(synthetic_n, "--synthetic-n")
    if len(n) != 3:
        fail(f"--synthetic-n needs three counts train,val,test, got {synthetic_n!r}")
    try:
        cfg = TopoCAMConfig(
            dataset=dataset, data_dir=str(data_dir) if data_dir else None, size=size, synthetic_n=n,
            backbone=backbone, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, cam=cam,
            weights=_floats(weights, "--weights"), tau=tau, outside=outside, bins=bins, betti_backend=betti_backend,
            mlp=_ints(mlp, "--mlp"), cache_dir=str(cache_dir) if cache_dir else None,
            cam_target="label" if leakage_audit else "predicted",
        ).validated()
        ensure_writable_dir(out)
        result = run_pipeline(cfg, progress=not quiet)
    except TopoCAMError as exc:
        fail(str(exc))
    if leakage_audit:
        result["leakage_audit"] = "CAM target = TRUE LABEL: these numbers leak labels and are not a valid result"
    write_json_atomic(out / "metrics.json", result)
    console.print(metrics_table(result))
    tm = result["timings_s"]
    console.print(
        "backbone: {arch} ({init}{c}), best epoch {e}; stage times: ".format(
            arch=result["backbone"]["arch"], init=result["backbone"]["init"],
            c=", cached" if result["backbone"]["cached"] else "", e=result["backbone"]["best_epoch"],
        )
        + ", ".join(f"{k} {v:.1f}s" for k, v in tm.items())
    )
    q = result["roi"]["quality"]
    if q:
        console.print(
            f"ROI vs true lesion (test): Dice {q['dice']:.3f} (random mask of same size {q['dice_random_same_size']:.3f}), "
            f"pointing game {q['pointing_game']:.3f} (chance {q['pointing_game_random']:.3f})"
        )
    if leakage_audit:
        console.print("[bold yellow]leakage audit: CAMs targeted the true label; not a valid result[/]")
    console.print(f"wrote {out / 'metrics.json'}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
