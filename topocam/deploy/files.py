"""Image files -> arrays at a model's size, prepared the way MedMNIST's data were.

Formats: 2D models read PNG, JPEG and NPY; 3D models read NPY and NIfTI
(``.nii``, ``.nii.gz``, with nibabel). A file of the wrong dimensionality is an
error that says so.

Preparation, in this order:

1. **Channels.** A grayscale model converts colour images to gray with
   Pillow's ``convert("L")`` (ITU-R 601-2 luma; an alpha channel is ignored);
   a colour model converts to RGB (gray replicated). NPY arrays may carry a
   trailing channel axis of 1 or 3, converted the same way. 3D volumes are
   single-channel.
2. **Intensities** to MedMNIST's range: 8-bit files keep their 0-255 values
   (divided by 255 by the model, as the training data were); 16-bit files are
   divided by 65535; floating-point files already in [0, 1] are used as they are;
   anything else (signed integers, floats outside [0, 1], e.g. CT in Hounsfield
   units) is min-max scaled to [0, 1] per image. That last rule is a fallback, not
   MedMNIST's windowing: prefer files in 0-255.
3. **Size.** An image already at the model's size is used untouched. Otherwise
   the largest centred crop with the model's aspect ratio (square for MedMNIST)
   is taken, as MedMNIST did for its non-square sources ("center-crop and
   resize"), and resized: 2D with Pillow's bicubic filter (antialiased when
   shrinking; 8-bit images are resized as 8-bit, so the result is 0-255 like
   MedMNIST's files), 3D with trilinear interpolation (``scipy.ndimage.zoom``,
   order 1) after a Gaussian anti-aliasing blur of sigma = (factor - 1) / 2 per
   shrunk axis (scikit-image's ``resize`` rule).

NIfTI volumes are reoriented to RAS from their affine (``core.scans``, nibabel's
``as_closest_canonical``: axes permuted and flipped, values untouched), singleton
trailing axes dropped; MedMNIST arrays written with
``nibabel.Nifti1Image(volume, numpy.eye(4))`` are already RAS and round-trip as
they are. A bundle exported from an imported dataset (``topocam data import``)
carries its preprocessing, and its files are prepared by ``core.scans`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import TopoCAMError
from ..core.scans import _crop_box, luma, suffix_of  # noqa: F401  (suffix_of: deploy's callers import it from here)
from .inputs import InputSpec

SUFFIXES_2D = (".png", ".jpg", ".jpeg", ".npy")
SUFFIXES_3D = (".npy", ".nii", ".nii.gz")
ALL_SUFFIXES = tuple(dict.fromkeys(SUFFIXES_2D + SUFFIXES_3D))


def supported(path: Path | str) -> bool:
    return suffix_of(path) in ALL_SUFFIXES


@dataclass
class LoadedImage:
    """One file prepared for a model: ``array`` is (*shape) or (*shape, 3),
    uint8 (0-255) or float32 in [0, 1]; ``steps`` says what was done."""

    array: np.ndarray
    source_shape: tuple[int, ...]
    steps: list[str] = field(default_factory=list)


def _dims(spec: InputSpec) -> str:
    return "2D images" if spec.ndim == 2 else "3D volumes"


def read_image(path: Path | str, spec: InputSpec, preprocessing: dict | None = None) -> LoadedImage:
    """Read one file and prepare it for a model with input ``spec``. A bundle exported from
    an imported dataset passes its ``preprocessing``: the file is then read and prepared by
    ``core.scans``, the very function ``data import`` used (NIfTI, DICOM series, TIFF too)."""
    path = Path(path)
    if preprocessing is not None:
        return _read_as_imported(path, spec, preprocessing)
    sfx = suffix_of(path)
    allowed = SUFFIXES_2D if spec.ndim == 2 else SUFFIXES_3D
    if sfx not in ALL_SUFFIXES:
        raise TopoCAMError(f"unsupported file type {sfx or '(none)'!r}; this model reads {', '.join(allowed)}")
    if sfx not in allowed:
        raise TopoCAMError(f"{sfx} files are {'2D images' if spec.ndim == 3 else '3D volumes'}; this model takes {_dims(spec)} ({spec.size_text()})")
    if not path.is_file():
        raise TopoCAMError("file does not exist" if not path.exists() else "not a regular file")
    try:
        open(path, "rb").close()
    except PermissionError:
        raise TopoCAMError("permission denied: this file cannot be read") from None
    if sfx in (".png", ".jpg", ".jpeg"):
        return _prepare(*_read_pil(path, spec), spec)
    if sfx == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:  # ValueError (pickled objects), OSError, bad header: all "not a readable .npy"
            raise TopoCAMError(f"cannot read as .npy ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        return _prepare(arr, [], spec)
    return _prepare(_read_nifti(path), [], spec)


def _read_as_imported(path: Path, spec: InputSpec, preprocessing: dict) -> LoadedImage:
    from ..core.scans import Preprocessing, prepare, read_scan

    pre = Preprocessing.from_dict(preprocessing)
    scan = read_scan(path)
    arr = prepare(scan, pre)
    if spec.channels == 3:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return LoadedImage(arr, scan.source_shape, [*scan.steps, f"prepared as at import ({pre.window} window, size {pre.size})"])


def _read_pil(path: Path, spec: InputSpec) -> tuple[np.ndarray, list[str]]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if spec.channels == 3:
                out = img.convert("RGB")
                step = [] if mode == "RGB" else [f"{mode} -> RGB"]
            elif mode in ("L", "I;16", "I;16L", "I;16B", "I", "F"):
                out, step = img, []
            else:
                out = img.convert("L")
                step = [f"{mode} -> grayscale (luma)"]
            arr = np.array(out)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise TopoCAMError(f"cannot read as an image ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if arr.dtype == np.int32 and arr.size and arr.min() >= 0 and arr.max() <= 65535:  # Pillow's "I" mode for 16-bit PNGs
        arr = arr.astype(np.uint16)
    return arr, step


def _read_nifti(path: Path) -> np.ndarray:
    """The voxels in RAS order (core.scans: one reader of NIfTI for import and predict)."""
    from ..core.scans import read_scan

    return read_scan(path).array


def _squeeze_to(arr: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, bool]:
    """(*spatial) or (*spatial, C) with C in (1, 3) for 2D, C = 1 for 3D; leading
    singleton axes dropped. Returns the array and whether it has a channel axis."""
    nd = spec.ndim
    while arr.ndim > nd and arr.shape[0] == 1 and not (arr.ndim == nd + 1 and arr.shape[-1] in ((1, 3) if nd == 2 else (1,))):
        arr = arr[0]
    if arr.ndim == nd:
        return arr, False
    if arr.ndim == nd + 1 and arr.shape[-1] in ((1, 3) if nd == 2 else (1,)):
        return arr, True
    shape = "×".join(str(s) for s in arr.shape)
    kind = "H×W, optionally with a trailing channel axis of 1 or 3" if nd == 2 else "D×H×W"
    raise TopoCAMError(f"has {arr.ndim} dimension(s) ({shape}); this model takes {_dims(spec)} ({kind})")


def _intensity(arr: np.ndarray, steps: list[str]) -> np.ndarray:
    """uint8 kept; uint16 / 65535; floats in [0, 1] kept; anything else min-max to [0, 1]."""
    if arr.dtype == bool:
        raise TopoCAMError("holds a boolean array (a mask?), not an image")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TopoCAMError(f"holds values of type {arr.dtype}, not image intensities")
    if arr.size == 0:
        raise TopoCAMError("holds an empty array")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        steps.append("16-bit / 65535")
        return arr.astype(np.float32) / 65535.0
    x = arr.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise TopoCAMError("contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if np.issubdtype(arr.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer) and lo >= 0 and hi <= 255:
        return arr.astype(np.uint8)
    steps.append(f"values {lo:g}..{hi:g} min-max scaled to [0, 1]")
    return ((x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)).astype(np.float32)


def _resize_2d(arr: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    h, w = target
    if arr.dtype == np.uint8:
        return np.array(Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC))
    chans = [arr] if arr.ndim == 2 else [arr[..., i] for i in range(arr.shape[-1])]
    out = [np.array(Image.fromarray(c.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BICUBIC)) for c in chans]
    res = out[0] if arr.ndim == 2 else np.stack(out, axis=-1)
    return np.clip(res, 0.0, 1.0).astype(np.float32)


def _resize_3d(vol: np.ndarray, target: tuple[int, int, int]) -> np.ndarray:
    from scipy.ndimage import gaussian_filter, zoom

    x = vol.astype(np.float32) / (255.0 if vol.dtype == np.uint8 else 1.0)
    factors = [s / t for s, t in zip(x.shape, target)]
    sigma = [max(0.0, (f - 1) / 2) for f in factors]
    if any(s > 0 for s in sigma):
        x = gaussian_filter(x, sigma, mode="nearest")
    out = zoom(x, [t / s for s, t in zip(x.shape, target)], order=1, mode="nearest", grid_mode=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _prepare(arr: np.ndarray, steps: list[str], spec: InputSpec) -> LoadedImage:
    arr = np.asarray(arr)
    source = tuple(int(s) for s in arr.shape)
    arr, has_channel = _squeeze_to(arr, spec)
    if has_channel:
        if arr.shape[-1] == 1 or spec.channels == 1:
            if arr.shape[-1] == 3:
                steps.append("RGB -> grayscale (luma)")
                arr = luma(arr)
            else:
                arr = arr[..., 0]
            has_channel = False
    if spec.channels == 3 and not has_channel:
        steps.append("grayscale replicated to RGB")
        arr = np.repeat(arr[..., None], 3, axis=-1)
    arr = _intensity(arr, steps)
    spatial = tuple(arr.shape[: spec.ndim])
    if spatial != spec.shape:
        box = _crop_box(spatial, spec.shape)
        cropped = arr[box]
        if cropped.shape[: spec.ndim] != spatial:
            steps.append(f"centre-cropped {'×'.join(map(str, spatial))} to {'×'.join(map(str, cropped.shape[: spec.ndim]))}")
        if spec.ndim == 2:
            arr = _resize_2d(cropped, spec.shape)
            steps.append(f"resized to {spec.size_text()} (bicubic)")
        else:
            arr = _resize_3d(cropped, spec.shape)
            steps.append(f"resized to {spec.size_text()} (trilinear, anti-aliased)")
    return LoadedImage(np.ascontiguousarray(arr), source, steps)
