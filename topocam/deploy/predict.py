"""``topocam predict``: an exported model applied to image files.

Inputs are files and folders (the supported files directly inside a folder,
sorted by name; see ``files.py`` for formats and preparation). Each file is
predicted on its own, so its result does not depend on which other files are
in the batch. Output, in the ``out`` folder:

* ``predictions.jsonl``: one JSON object per input file, in input order:
  ``file``, ``class``, ``class_name``, ``probabilities``, ``roi_fraction``,
  ``overlay`` and ``preprocessing`` (what was done to the file), or ``file``
  and ``error`` for a file that could not be read (missing, unreadable, not an
  image; a folder that cannot be listed) or has the wrong dimensionality.
  Written when all files are done (temporary file, then rename).
* ``overlays/<name>.png``: the fused CAM as a heat map with the ROI contour
  over the image (3D: a montage of slices).

A bad file does not stop the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.atomic import write_bytes_atomic, write_text_atomic
from ..core.errors import TopoCAMError
from .files import ALL_SUFFIXES, read_image, suffix_of, supported
from .overlay import render_png


@dataclass
class PredictSummary:
    records: list[dict[str, Any]]
    jsonl: Path
    overlays: Path

    @property
    def n_failed(self) -> int:
        return sum("error" in r for r in self.records)


FOLDER_UNREADABLE = "permission denied: this folder cannot be listed"


def collect_files(paths: list[Path]) -> list[Path]:
    """Files as given, and the supported files directly inside each folder (sorted). A folder
    that cannot be listed stays in the list as itself: :func:`predict_files` reports it as its
    error, as a missing or unreadable file is."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            try:
                found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and supported(f))
            except PermissionError:
                out.append(p)
                continue
            if not found:
                raise TopoCAMError(f"folder {p} holds no image files ({', '.join(ALL_SUFFIXES)})")
            out += found
        else:
            out.append(p)  # missing, unreadable or unsupported: reported as that file's error
    return out


def _overlay_name(path: Path, taken: set[str]) -> str:
    sfx = suffix_of(path)
    stem = path.name[: len(path.name) - len(sfx)] if sfx else path.name
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "image"
    name, k = f"{stem}.png", 2
    while name in taken:
        name, k = f"{stem}-{k}.png", k + 1
    taken.add(name)
    return name


def title_for(class_name: str, p: float, roi_fraction: float, ndim: int = 2) -> str:
    return f"{class_name} (p = {p:.2f})\nROI: {roi_fraction:.0%} of the {'image' if ndim == 2 else 'volume'}"


def predict_one(model, path: Path, titled: bool = True) -> tuple[dict[str, Any], bytes]:
    """Result record (without ``file``/``overlay``) and overlay PNG of one file
    (titled with the class, probability and ROI size unless ``titled`` is False)."""
    bundle = model.bundle
    img = read_image(path, bundle.input, bundle.preprocessing)
    ex = model.explain(img.array[None])
    rec = ex.records()[0]
    k = rec["class"]
    rec = {"class": k, "class_name": bundle.class_names[k], "probabilities": rec["probabilities"],
           "roi_fraction": rec["roi_fraction"], "preprocessing": img.steps}
    title = title_for(bundle.class_names[k], rec["probabilities"][k], rec["roi_fraction"], bundle.input.ndim) if titled else ""
    png = render_png(ex.gray[0], ex.out.fused[0], ex.out.masks[0], title)
    return rec, png


def predict_files(model, paths: list[Path], out: Path, progress: bool = True) -> PredictSummary:
    """``model``: a TopoCAMModel (``serve.load_model(...)[1]``)."""
    from tqdm.auto import tqdm

    files = collect_files(paths)
    out = Path(out)
    overlays = out / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    records: list[dict[str, Any]] = []
    for path in tqdm(files, desc="predict", unit="file", disable=not progress or len(files) < 2):
        if path.is_dir():  # only a folder collect_files could not list
            records.append({"file": str(path), "error": FOLDER_UNREADABLE})
            continue
        try:
            rec, png = predict_one(model, path)
        except TopoCAMError as exc:
            records.append({"file": str(path), "error": str(exc)})
            continue
        except Exception as exc:  # a file that breaks a reader in an unforeseen way must not stop the others
            records.append({"file": str(path), "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"})
            continue
        name = _overlay_name(path, taken)
        write_bytes_atomic(overlays / name, png)
        records.append({"file": str(path), **rec, "overlay": f"overlays/{name}"})
    jsonl = out / "predictions.jsonl"
    write_text_atomic(jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return PredictSummary(records, jsonl, overlays)
