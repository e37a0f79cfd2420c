"""``topocam data import``: the user's own scans and labels become a dataset folder."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    OVERWRITE_HELP,
    QUIET_OPTION,
    _floats,
    app,
    console,
    err,
    fail,
    refuse_earlier_results,
)

data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="bring your own scans in: folders of NIfTI, DICOM or PNG with a labels CSV")
app.add_typer(data_app, name="data")


def _spacing(text: str) -> tuple[float, ...] | None:
    """"none" / "auto" -> no resampling (see docs/data.md); "X,Y,Z" -> that spacing in mm."""
    if text.strip().lower() in ("none", "auto"):
        return None
    sp = _floats(text, "--spacing")
    if len(sp) != 3 or min(sp) <= 0:
        fail(f"--spacing {text!r}: give auto, none or three positive numbers X,Y,Z in mm (e.g. 1,1,2.5)")
    return sp


@data_app.command("import")
def import_cmd(
    source: Path = typer.Argument(..., help="folder holding the scans (files, or DICOM series folders) the labels file names"),
    labels: Path = typer.Option(..., "--labels", help="CSV with columns file (relative to SOURCE), label (integer or class name), optionally split and patient"),
    out: Path = typer.Option(..., "--out", help="dataset folder to write; then use it as --dataset OUT or [data] dataset = \"OUT\""),
    size: int = typer.Option(28, "--size", help="model size: 28, 64, 128 or 224 (MedMNIST's sizes)"),
    split_column: str = typer.Option("split", "--split-column", help="labels column with train/val/test; without it, a stratified seeded 70/10/20 split"),
    file_column: str = typer.Option("file", "--file-column", help="labels column naming the file"),
    label_column: str = typer.Option("label", "--label-column", help="labels column holding the class"),
    patient_column: str = typer.Option("patient", "--patient-column", help="labels column with the patient id: no patient in two splits"),
    classes: str = typer.Option("", "--classes", help="comma-separated class names in index order (default: from the labels)"),
    seed: int = typer.Option(0, "--seed", help="seed of the split drawn when there is no split column"),
    spacing: str = typer.Option("none", "--spacing", help="resample volumes to X,Y,Z mm; none or auto: no resampling"),
    window: str = typer.Option("auto", "--window", help="intensities to 0-255: auto, ct:LEVEL,WIDTH (HU) or percentile:LO,HI"),
    strict: bool = typer.Option(False, "--strict", help="stop at the first bad file instead of skipping it"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    quiet: bool = QUIET_OPTION,
) -> None:
    """Read, orient (RAS), window and resize every labelled scan into a MedMNIST-layout dataset."""
    from tqdm.auto import tqdm

    from topocam import __version__
    from topocam.core.errors import TopoCAMError
    from topocam.core.imports import import_dataset, read_labels
    from topocam.core.scans import parse_window

    if size not in (28, 64, 128, 224):
        fail(f"--size {size}: choose 28, 64, 128 or 224")
    if not source.is_dir():
        fail(f"SOURCE {source} is not a folder")
    if out.exists() and not overwrite:
        refuse_earlier_results(out, overwrite)
        if out.is_file():
            fail(f"--out {out} is a file; choose a folder name")
    try:
        parse_window(window)
        rows = read_labels(labels, file_column, label_column, split_column, patient_column)
        res = import_dataset(source, rows, out, size, window=window, spacing=_spacing(spacing), seed=seed, strict=strict,
                             progress=lambda it: tqdm(it, desc="import", unit="file", disable=quiet, total=len(rows)), version=__version__,
                             classes=[c.strip() for c in classes.split(",") if c.strip()] or None)
    except TopoCAMError as exc:
        fail(str(exc))
    n = sum(res.counts.values())
    console.print(f"imported {n} images into {out} (train {res.counts['train']}, val {res.counts['val']}, test {res.counts['test']})")
    if res.skipped:
        for name, reason in res.skipped:
            err.print(f"skipped {name}: {reason}", markup=False, highlight=False)
        err.print(f"{len(res.skipped)} skipped; listed in {out / 'skipped.csv'}", markup=False, highlight=False)
        raise typer.Exit(1)
