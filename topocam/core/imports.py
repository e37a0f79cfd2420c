"""``topocam data import``: a folder of scans plus a labels CSV -> a dataset folder.

The folder holds ``data.npz`` (MedMNIST's layout: uint8 ``{split}_images``,
``{split}_labels`` of shape (N, 1)), ``manifest.csv`` (one row per image),
``dataset.json`` (preprocessing, class names, counts) and ``skipped.csv``. It is
written under a temporary name beside ``out`` and renamed at the end.

Memory: one scan is held at a time; prepared images go to one memory-mapped
``.npy`` per split (preallocated, in the temporary folder) and are packed into the
npz from there, so memory is bounded by one source scan plus numpy's write buffer.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_path, json_safe
from .errors import TopoCAMError
from .scans import SCAN_SUFFIXES, Preprocessing, prepare, read_scan, suffix_of

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
MANIFEST_COLUMNS = ["file", "sha256", "source_shape", "spacing", "orientation", "label", "class_name", "split", "patient", "index"]


@dataclass
class Row:
    file: str
    label: str
    split: str = ""
    patient: str = ""


@dataclass
class ImportResult:
    out: Path
    counts: dict[str, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_labels(path: Path, file_col: str = "file", label_col: str = "label", split_col: str = "split", patient_col: str = "patient") -> list[Row]:
    """The labels CSV; missing required columns are one error naming them."""
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            missing = [c for c in (file_col, label_col) if c not in cols]
            if missing:
                raise TopoCAMError(f"labels file {path} has no column {', '.join(missing)} (it has {', '.join(cols) or 'none'}); map yours with --file-column / --label-column")
            return [Row(r[file_col].strip(), r[label_col].strip(), (r.get(split_col) or "").strip().lower(), (r.get(patient_col) or "").strip()) for r in reader]
    except OSError as exc:
        raise TopoCAMError(f"cannot read labels file {path}: {exc.strerror}") from None


def class_table(labels: Iterable[str], given: list[str] | None = None) -> list[str]:
    """The classes, in index order: ``given`` (--classes); else, when most labels are
    integers, "0".."K-1" (a non-integer label then is not a class); else the sorted names."""
    if given:
        return list(given)
    vals = sorted(set(labels))
    ints = [v for v in vals if v.isdigit()]
    if ints and len(ints) * 2 >= len(vals):
        return [str(i) for i in range(max(int(v) for v in ints) + 1)]
    return vals


def split_rows(rows: list[Row], classes: list[str], seed: int) -> None:
    """Stratified, seeded 70/10/20 split; by patient when patients are given (a
    patient's rows share the split drawn for the patient's first class)."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.patient or f"\0{r.file}", []).append(r)
    by_class: dict[str, list[str]] = {}
    for g, rs in groups.items():
        by_class.setdefault(rs[0].label, []).append(g)
    for lab in sorted(by_class):
        gs = sorted(by_class[lab])
        rng.shuffle(gs)
        n = len(gs)
        n_train, n_val = round(n * SPLIT_FRACTIONS[0]), round(n * SPLIT_FRACTIONS[1])
        for i, g in enumerate(gs):
            s = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            for r in groups[g]:
                r.split = s


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _source_files(source: Path) -> set[str]:
    """Files and DICOM series folders under SOURCE, relative, the way the labels name them."""
    found = set()
    for p in source.rglob("*"):
        if p.is_file() and suffix_of(p) in SCAN_SUFFIXES:
            rel = p.relative_to(source)
            found.add(str(rel.parent) if suffix_of(p) == ".dcm" else str(rel))
    return found


def import_dataset(
    source: Path,
    rows: list[Row],
    out: Path,
    size: int,
    window: str = "auto",
    spacing: tuple[float, ...] | None = None,
    seed: int = 0,
    strict: bool = False,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    version: str = "",
    classes: list[str] | None = None,
) -> ImportResult:
    """Read, check, prepare and write every labelled scan; see the module docstring."""
    skipped: list[tuple[str, str]] = []

    def skip(name: str, reason: str) -> None:
        if strict:
            raise TopoCAMError(f"{name}: {reason} (--strict)")
        skipped.append((name, reason))

    classes = class_table((r.label for r in rows), classes)
    named = {r.file for r in rows}
    for f in sorted(_source_files(source) - named):
        skip(f, "in SOURCE but not in the labels file")
    if any(not r.split for r in rows):
        split_rows(rows, classes, seed)
    for r in rows:
        if r.split not in SPLITS:
            raise TopoCAMError(f"{r.file}: split {r.split!r} is not one of {', '.join(SPLITS)}")
    counts = {s: sum(r.split == s for r in rows) for s in SPLITS}
    pre: Preprocessing | None = None
    kept: dict[str, list[dict]] = {s: [] for s in SPLITS}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        mm: dict[str, np.ndarray] = {}
        for r in progress(rows):
            path = source / r.file
            if r.label not in classes:
                skip(r.file, f"label {r.label!r} is not a class ({', '.join(classes)})")
                continue
            if not path.exists():
                skip(r.file, "named in the labels file but missing from SOURCE")
                continue
            try:
                scan = read_scan(path)
                if pre is None:
                    pre = Preprocessing(size=size, ndim=scan.ndim, window=window, spacing=spacing if scan.ndim == 3 else None)
                if scan.ndim != pre.ndim:
                    raise TopoCAMError(f"is {scan.ndim}D but the dataset is {pre.ndim}D (2D and 3D mixed)")
                img = prepare(scan, pre)
            except TopoCAMError as exc:
                skip(r.file, str(exc))
                continue
            if r.split not in mm:
                mm[r.split] = np.lib.format.open_memmap(tmp / f".{r.split}.npy", "w+", np.uint8, (counts[r.split], *img.shape))
            k = len(kept[r.split])
            mm[r.split][k] = img
            kept[r.split].append({
                "file": r.file, "sha256": _sha256(path), "source_shape": "x".join(map(str, scan.source_shape)),
                "spacing": ",".join(f"{s:g}" for s in scan.spacing), "orientation": scan.orientation,
                "label": classes.index(r.label), "class_name": classes[classes.index(r.label)], "split": r.split, "patient": r.patient, "index": k,
            })
        if pre is None:
            raise TopoCAMError("no scan could be imported; see the reasons above")
        for s in SPLITS:
            labs = {m["label"] for m in kept[s]}
            if len(labs) < 2:
                raise TopoCAMError(f"split {s} has {len(kept[s])} image(s) of {len(labs)} class(es); every split needs at least two classes (give a split column, or more data)")
        arrays = {}
        for s in SPLITS:
            n = len(kept[s])
            arrays[f"{s}_images"] = mm[s][:n]
            arrays[f"{s}_labels"] = np.array([[m["label"]] for m in kept[s]], dtype=np.uint8 if len(classes) < 256 else np.int64)
        np.savez(tmp / "data.npz", **arrays)
        del arrays, mm
        for s in SPLITS:
            (tmp / f".{s}.npy").unlink()
        with open(tmp / "manifest.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, MANIFEST_COLUMNS)
            w.writeheader()
            for s in SPLITS:
                w.writerows(kept[s])
        with open(tmp / "skipped.csv", "w", newline="") as fh:
            w2 = csv.writer(fh)
            w2.writerow(["file", "reason"])
            w2.writerows(skipped)
        final = {s: len(kept[s]) for s in SPLITS}
        meta = {"format": "topocam-dataset-1", "tool_version": version, "preprocessing": pre.to_dict(), "class_names": classes,
                "counts": final, "skipped": len(skipped), "source": str(source)}
        (tmp / "dataset.json").write_text(json.dumps(json_safe(meta), indent=2) + "\n")
    return ImportResult(out, final, skipped)


def read_dataset_meta(folder: Path) -> dict:
    """``dataset.json`` of an imported dataset folder."""
    try:
        return json.loads((Path(folder) / "dataset.json").read_text())
    except (OSError, ValueError) as exc:
        raise TopoCAMError(f"{folder}: not an imported dataset (dataset.json unreadable: {exc}); run `topocam data import` again") from None
