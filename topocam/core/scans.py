"""Scan files -> canonical arrays -> model-size uint8 images: the one preparation path.

Reading follows the field's libraries: nibabel for NIfTI (reoriented to RAS from the
affine with ``nibabel.as_closest_canonical``), pydicom for DICOM series (slices ordered
along the slice normal from ImagePositionPatient / ImageOrientationPatient, rescaled to
HU, axes permuted and flipped to RAS), Pillow / tifffile for PNG, JPEG and TIFF.

:func:`prepare` then resamples (optional), windows to [0, 1], centre-crops and resizes
to the model's size, and quantises to uint8 like MedMNIST's files. ``data import``
uses it for every image; a bundle carrying a :class:`Preprocessing` uses it again
at prediction, so the two are bit-identical by construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import TopoCAMError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii", ".nii.gz")
SCAN_SUFFIXES = IMAGE_SUFFIXES + VOLUME_SUFFIXES + (".npy", ".dcm")
CT_DEFAULT_WINDOW = (40.0, 400.0)  # abdominal soft-tissue window (level, width) in HU
_LUMA = np.array([0.299, 0.587, 0.114])


def suffix_of(path: Path | str) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


@dataclass
class Scan:
    """One file (or DICOM series) read: ``array`` in RAS voxel order for volumes,
    (H, W) for images; the geometry it came with."""

    array: np.ndarray
    spacing: tuple[float, ...]
    orientation: str  # axis codes of the source, e.g. "LPS"; "" for 2D images
    source_shape: tuple[int, ...]
    modality: str = ""
    steps: list[str] = field(default_factory=list)

    @property
    def ndim(self) -> int:
        return self.array.ndim


@dataclass(frozen=True)
class Preprocessing:
    """The settings that turn a :class:`Scan` into a model input; saved with a dataset
    and carried by a bundle. ``window``: "auto", "ct:L,W" or "percentile:LO,HI";
    ``spacing``: None (no resampling) or the target spacing per axis."""

    size: int = 28
    ndim: int = 2
    window: str = "auto"
    spacing: tuple[float, ...] | None = None
    channels: int = 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spacing"] = list(self.spacing) if self.spacing else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        sp = d.get("spacing")
        return cls(int(d["size"]), int(d["ndim"]), str(d.get("window", "auto")), tuple(float(s) for s in sp) if sp else None, int(d.get("channels", 1)))


def parse_window(text: str) -> tuple[str, tuple[float, float]]:
    """"auto" | "ct:L,W" | "percentile:LO,HI" -> (kind, numbers); an error says the forms."""
    text = text.strip().lower()
    if text == "auto":
        return "auto", (0.0, 0.0)
    kind, _, rest = text.partition(":")
    try:
        a, b = (float(v) for v in rest.split(","))
    except ValueError:
        a = b = float("nan")
    if kind == "ct" and b > 0 or kind == "percentile" and 0 <= a < b <= 100:
        return kind, (a, b)
    raise TopoCAMError(f"window {text!r} is not understood; use auto, ct:LEVEL,WIDTH (e.g. ct:40,400) or percentile:LO,HI (e.g. percentile:1,99)")


# ------------------------------------------------------------------ reading


def read_scan(path: Path | str) -> Scan:
    """Read one file or DICOM series folder; TopoCAMError says why it cannot be read."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(sorted(p for p in path.iterdir() if p.is_file()))
    if not path.is_file():
        raise TopoCAMError("file does not exist")
    sfx = suffix_of(path)
    if sfx in VOLUME_SUFFIXES:
        return _read_nifti(path)
    if sfx in IMAGE_SUFFIXES:
        return _read_image(path)
    if sfx == ".dcm":
        return read_dicom_series([path])
    if sfx == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 -- any failure of the reader means "cannot read"
            raise TopoCAMError(f"cannot read as .npy ({type(exc).__name__}: {str(exc)[:200]})") from None
        return Scan(arr, (1.0,) * arr.ndim, "", tuple(arr.shape))
    raise TopoCAMError(f"unsupported file type {sfx or '(none)'!r}; readable: {', '.join(SCAN_SUFFIXES)} or a DICOM series folder")


def _read_nifti(path: Path) -> Scan:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        affine = img.affine
    except Exception as exc:  # noqa: BLE001 -- ImageFileError, OSError, EOFError (truncated .gz), ...
        raise TopoCAMError(f"cannot read as NIfTI ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise TopoCAMError("has a singular affine (no orientation); fix the header's qform/sform")
    codes = "".join(nib.aff2axcodes(affine))
    try:
        canon = nib.as_closest_canonical(img)
        arr = np.asanyarray(canon.dataobj)  # the stored dtype unless the header scales values
    except Exception as exc:  # noqa: BLE001 -- any failure of the reader means "cannot read"
        raise TopoCAMError(f"cannot read as NIfTI ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    spacing = tuple(float(s) for s in canon.header.get_zooms()[: arr.ndim])
    steps = [] if codes == "RAS" else [f"reoriented {codes} -> RAS"]
    return Scan(np.asarray(arr), spacing, codes, shape, steps=steps)


def _read_image(path: Path) -> Scan:
    if suffix_of(path) in (".tif", ".tiff"):
        import tifffile

        try:
            arr = tifffile.imread(str(path))
        except Exception as exc:  # noqa: BLE001 -- any failure of the reader means "cannot read"
            raise TopoCAMError(f"cannot read as TIFF ({type(exc).__name__}: {str(exc)[:200]})") from None
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img.load()
                arr = np.array(img.convert("RGB") if img.mode in ("P", "LA", "PA", "CMYK", "YCbCr") else img)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise TopoCAMError(f"cannot read as an image ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        if arr.dtype == np.int32 and arr.size and arr.min() >= 0 and arr.max() <= 65535:  # Pillow's "I" mode for 16-bit PNGs
            arr = arr.astype(np.uint16)
    shape = tuple(int(s) for s in arr.shape)
    steps: list[str] = []
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        steps.append(f"{'RGBA' if arr.shape[-1] == 4 else 'RGB'} -> grayscale (luma; alpha ignored)")
        arr = luma(arr[..., :3])
    if arr.ndim != 2:
        raise TopoCAMError(f"has shape {'×'.join(map(str, shape))}; an image must be H×W, RGB or RGBA")
    return Scan(arr, (1.0, 1.0), "", shape, steps=steps)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma: Pillow's ``convert("L")`` fixed-point arithmetic for uint8."""
    if rgb.dtype == np.uint8:
        r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
    out = rgb.astype(np.float64) @ _LUMA
    return np.rint(out).astype(rgb.dtype) if np.issubdtype(rgb.dtype, np.integer) else out.astype(rgb.dtype)


def read_dicom_series(files: list[Path]) -> Scan:
    """Slices ordered along the normal of ImageOrientationPatient; uneven gaps (a
    missing slice) and repeated positions are errors; values rescaled to HU; the
    (slice, row, column) volume permuted and flipped to RAS from the direction cosines."""
    import pydicom

    if not files:
        raise TopoCAMError("is an empty folder, not a DICOM series")
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
            pix = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 -- any failure of the reader means "cannot read"
            raise TopoCAMError(f"{f.name}: cannot read as DICOM ({type(exc).__name__}: {str(exc)[:200]})") from None
        slices.append((ds, pix))
    ds0 = slices[0][0]
    try:
        iop = np.array([float(v) for v in ds0.ImageOrientationPatient])
        row, col = iop[:3], iop[3:]
        normal = np.cross(row, col)
        pos = [np.array([float(v) for v in ds.ImagePositionPatient]) for ds, _ in slices]
        ps = [float(v) for v in ds0.PixelSpacing]
    except AttributeError as exc:
        raise TopoCAMError(f"lacks a geometry tag ({exc}); a series needs ImagePositionPatient, ImageOrientationPatient and PixelSpacing") from None
    dist = np.array([float(p @ normal) for p in pos])
    order = np.argsort(dist, kind="stable")
    d = dist[order]
    gaps = np.diff(d)
    names = [files[i].name for i in order]
    if len(d) > 1:
        dup = np.flatnonzero(np.abs(gaps) < 1e-3)
        if dup.size:
            raise TopoCAMError(f"has duplicate slice positions ({names[dup[0]]} and {names[dup[0] + 1]} at {d[dup[0]]:g} mm)")
        step = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - step) > 0.1 * step)
        if bad.size:
            raise TopoCAMError(f"has a missing slice (gap of {gaps[bad[0]]:g} mm after {names[bad[0]]}, {step:g} mm elsewhere)")
    else:
        step = float(getattr(ds0, "SliceThickness", 1.0) or 1.0)
    vol = np.stack([slices[i][1] for i in order]).astype(np.float64)  # (slice, row, col)
    slope = float(getattr(ds0, "RescaleSlope", 1.0) or 1.0)
    inter = float(getattr(ds0, "RescaleIntercept", 0.0) or 0.0)
    vol = vol * slope + inter
    # voxel axes (slice, row, col) step along (normal, column cosine, row cosine) in LPS
    # patient space; in RAS that affine is nibabel's to reorient (its own orientation code)
    import nibabel as nib

    aff = np.eye(4)
    for k, (v, sp) in enumerate(zip((normal, col, row), (step, ps[0], ps[1]))):
        aff[:3, k] = v * np.array([-1.0, -1.0, 1.0]) * sp
    ornt = nib.orientations.io_orientation(aff)
    codes = "".join(nib.aff2axcodes(aff))
    arr = nib.orientations.apply_orientation(vol, ornt)
    spacing_in = (step, ps[0], ps[1])
    spacing = tuple(spacing_in[int(np.flatnonzero(ornt[:, 0] == k)[0])] for k in range(3))
    if len(files) == 1:
        arr2 = np.asarray(vol[0])
        return Scan(arr2, (ps[0], ps[1]), "", tuple(arr2.shape), str(getattr(ds0, "Modality", "")))
    return Scan(np.ascontiguousarray(arr), spacing, codes, tuple(vol.shape), str(getattr(ds0, "Modality", "")), [f"DICOM series of {len(files)} slices, {codes} -> RAS"])


# ------------------------------------------------------------------ preparing


def _resample(arr: np.ndarray, spacing: tuple[float, ...], target: tuple[float, ...]) -> np.ndarray:
    from scipy.ndimage import zoom

    factors = [s / t for s, t in zip(spacing, target)]
    if all(abs(f - 1) < 1e-6 for f in factors):
        return arr
    return zoom(arr.astype(np.float64), factors, order=1, mode="nearest", grid_mode=True)


def window01(arr: np.ndarray, window: str, modality: str = "") -> np.ndarray | None:
    """Intensities to [0, 1] (float64); None for uint8 kept as is under "auto".
    auto: uint8 kept; CT -> ct:40,400; uint16 / 65535; floats in [0, 1] kept; integers
    in 0..255 kept; else min-max per image (topocam/deploy/files.py's rule)."""
    kind, (a, b) = parse_window(window)
    if arr.size == 0:
        raise TopoCAMError("holds an empty array")
    x = arr.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise TopoCAMError("contains NaN or infinite values")
    if kind == "auto" and modality.upper() == "CT":
        kind, (a, b) = "ct", CT_DEFAULT_WINDOW
    if kind == "ct":
        return np.clip((x - (a - b / 2)) / b, 0.0, 1.0)
    if kind == "percentile":
        lo, hi = np.percentile(x, [a, b])
        return np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(x)
    if arr.dtype == np.uint8:
        return None
    if arr.dtype == np.uint16:
        return x / 65535.0
    lo, hi = float(x.min()), float(x.max())
    if np.issubdtype(arr.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return x
    if np.issubdtype(arr.dtype, np.integer) and lo >= 0 and hi <= 255:
        return x / 255.0
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _crop_box(shape: tuple[int, ...], target: tuple[int, ...]) -> tuple[slice, ...]:
    scale = min(s / t for s, t in zip(shape, target))
    sizes = [max(1, min(s, round(t * scale))) for s, t in zip(shape, target)]
    return tuple(slice((s - k) // 2, (s - k) // 2 + k) for s, k in zip(shape, sizes))


def _resize(x: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    """[0, 1] float -> [0, 1] float at ``target``: anti-aliasing blur of sigma (factor-1)/2
    per shrunk axis, then linear interpolation (scikit-image's ``resize`` rule)."""
    from scipy.ndimage import gaussian_filter, zoom

    factors = [s / t for s, t in zip(x.shape, target)]
    sigma = [max(0.0, (f - 1) / 2) for f in factors]
    if any(s > 0 for s in sigma):
        x = gaussian_filter(x, sigma, mode="nearest")
    return np.clip(zoom(x, [t / s for s, t in zip(x.shape, target)], order=1, mode="nearest", grid_mode=True), 0.0, 1.0)


def prepare(scan: Scan, pre: Preprocessing) -> np.ndarray:
    """A :class:`Scan` -> (size,)*ndim uint8: resample, window, centre-crop, resize, quantise."""
    if scan.ndim != pre.ndim:
        raise TopoCAMError(f"is {scan.ndim}D; this dataset/model takes {pre.ndim}D {'images' if pre.ndim == 2 else 'volumes'}")
    arr = scan.array
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TopoCAMError(f"holds values of type {arr.dtype}, not image intensities")
    if pre.spacing is not None and pre.ndim == 3:
        arr = _resample(arr, scan.spacing, pre.spacing)
    x = window01(arr, pre.window, scan.modality)
    target = (pre.size,) * pre.ndim
    if x is None and arr.shape == target:
        return np.ascontiguousarray(arr)
    if x is None:
        x = arr.astype(np.float64) / 255.0
    if x.shape != target:
        x = _resize(x[_crop_box(x.shape, target)], target)
    return np.rint(x * 255.0).astype(np.uint8)


def prepare_file(path: Path | str, pre: Preprocessing) -> np.ndarray:
    """The predict path: read and prepare one file exactly as ``data import`` did."""
    return prepare(read_scan(path), pre)
