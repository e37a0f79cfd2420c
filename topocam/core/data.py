"""Datasets: MedMNIST (via the ``medmnist`` package's INFO), a user's own npz
in the MedMNIST layout, and seeded synthetic 2D/3D sets with known lesions.

Every loader returns a validated :class:`Dataset` with official splits, images
as float32 in (n, C, *spatial) and integer labels in (n,). Nothing is dropped:
a problem with any image is an error, never a skipped sample.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TopoCAMError

SPLITS: tuple[str, ...] = ("train", "val", "test")
SYNTHETIC = ("synthetic2d", "synthetic3d")
DATA_DIR_ENV = "TOPOCAM_DATA_DIR"
OFFLINE_ENV = "TOPOCAM_OFFLINE"  # set to 1 to skip download attempts
MEDMNIST_SIZES = (28, 64, 128, 224)
DEFAULT_SYNTHETIC_N: tuple[int, int, int] = (120, 40, 40)  # train, val, test images of a synthetic set
# Largest synthetic side: the default 200 images at 128^3 are 1.7 GB as float32
# (2D at 1024: 0.8 GB); beyond that a run would exhaust memory before it starts.
SYNTHETIC_SIZE_RANGE = {2: (12, 1024), 3: (12, 128)}


class Images:
    """A split's images kept as stored (uint8 or uint16: a quarter or half the memory
    of float32) and read as float32 scaled to [0, 1] a selection at a time, e.g.
    ``images[lo:hi]`` or ``images[idx]``: the same values, bit for bit, as converting
    the whole array at load time (the conversion is elementwise). Has the shape,
    ``len`` and ``ndim`` of the float32 array it stands for; ``np.asarray`` gives that
    whole array (for small sets and tests; the pipeline reads chunks)."""

    dtype = np.dtype(np.float32)

    def __init__(self, raw: np.ndarray, scale: float):
        self.raw = raw
        self.scale = scale

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)

    @property
    def ndim(self) -> int:
        return self.raw.ndim

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, key) -> np.ndarray:
        return np.asarray(self.raw[key]).astype(np.float32) / self.scale

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


def images_in(x: "np.ndarray | Images", lo: int, hi: int) -> np.ndarray:
    """Images lo..hi of a split as a C-contiguous float32 array."""
    return np.ascontiguousarray(x[lo:hi])


@dataclass(frozen=True)
class Dataset:
    """One dataset with its three official splits."""

    name: str
    task: str  # "binary-class" or "multi-class" (MedMNIST's task names)
    n_classes: int
    x: dict[str, "np.ndarray | Images"]  # split -> (n, C, *spatial) float32 (Images: read a chunk at a time)
    y: dict[str, np.ndarray]  # split -> (n,) int64
    fingerprint: str  # content hash: part of every cache key built on this data
    source: str  # where it came from (file path or generator settings)
    lesion_masks: dict[str, np.ndarray] | None = None  # synthetic only: (n, *spatial) bool
    class_names: list[str] = field(default_factory=list)
    preprocessing: dict | None = None  # an imported dataset's core.scans.Preprocessing, carried to its bundles

    @property
    def ndim(self) -> int:
        """Spatial dimensionality: 2 or 3."""
        return self.x["train"].ndim - 2

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x["train"].shape[2:])

    @property
    def n_channels(self) -> int:
        return int(self.x["train"].shape[1])

    def gray(self, split: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """(hi - lo, *spatial) single-channel images lo..hi of a split: what the topology sees."""
        x = self.x[split][lo:hi]
        return x[:, 0] if x.shape[1] == 1 else x.mean(axis=1)


# ---------------------------------------------------------------- validation


def _to_float_images(arr: np.ndarray, where: str) -> "np.ndarray | Images":
    """Float images are converted and checked now; integer ones stay as stored and are
    converted a chunk at a time when read (:class:`Images`)."""
    if arr.dtype == np.uint8:
        return Images(arr, 255.0)
    if arr.dtype == np.uint16:
        return Images(arr, 65535.0)
    if np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        bad = ~np.isfinite(out)
        if bad.any():
            idx = int(np.argwhere(bad.reshape(len(out), -1).any(axis=1))[0][0])
            raise TopoCAMError(f"{where}: image {idx} contains NaN or Inf; clean or remove it before running")
        return out
    raise TopoCAMError(f"{where}: images have dtype {arr.dtype}; expected uint8, uint16 or float")


def _channels_first(arr: "np.ndarray | Images", where: str) -> "np.ndarray | Images":
    """(n,H,W) -> (n,1,H,W); (n,H,W,3) -> (n,3,H,W); (n,D,H,W) -> (n,1,D,H,W)."""
    if isinstance(arr, Images):
        return Images(_channels_first(arr.raw, where), arr.scale)
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4 and arr.shape[-1] == 3 and arr.shape[1] != 3:
        return np.moveaxis(arr, -1, 1)
    if arr.ndim == 4:
        return arr[:, None]
    raise TopoCAMError(
        f"{where}: images have shape {arr.shape}; expected (n, H, W), (n, H, W, 3) or (n, D, H, W)"
    )


def validate_arrays(
    arrays: dict[str, np.ndarray], where: str, n_classes: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Check an npz-like mapping in the MedMNIST layout; return x, y, n_classes."""
    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in arrays]
    if missing:
        raise TopoCAMError(
            f"{where}: missing key(s) {', '.join(missing)}; an npz needs train/val/test _images and _labels"
        )
    xs: dict[str, np.ndarray] = {}
    ys: dict[str, np.ndarray] = {}
    for s in SPLITS:
        imgs = np.asarray(arrays[f"{s}_images"])
        labels = np.asarray(arrays[f"{s}_labels"])
        if len(imgs) == 0:
            raise TopoCAMError(f"{where}: split {s!r} is empty; every split needs at least one image")
        if labels.ndim == 2 and labels.shape[1] != 1:
            raise TopoCAMError(
                f"{where}: {s}_labels has shape {labels.shape}; multi-label data is not supported (one label per image)"
            )
        labels = labels.reshape(-1)
        if len(labels) != len(imgs):
            raise TopoCAMError(f"{where}: {s} has {len(imgs)} images but {len(labels)} labels")
        if not np.issubdtype(labels.dtype, np.integer):
            if np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
                labels = labels.astype(np.int64)
            else:
                raise TopoCAMError(f"{where}: {s}_labels must be integer class indices, got dtype {labels.dtype}")
        if labels.min() < 0:
            raise TopoCAMError(f"{where}: {s}_labels contains negative label {int(labels.min())}")
        xs[s] = _channels_first(_to_float_images(imgs, f"{where} [{s}]"), f"{where} [{s}]")
        ys[s] = labels.astype(np.int64)
    shapes = {s: xs[s].shape[1:] for s in SPLITS}
    if len(set(shapes.values())) != 1:
        raise TopoCAMError(f"{where}: splits differ in image shape: {shapes}")
    if min(xs["train"].shape[2:]) < 8:
        raise TopoCAMError(f"{where}: images of shape {xs['train'].shape[2:]} are too small (need >= 8 per side)")
    k = int(max(y.max() for y in ys.values())) + 1
    if n_classes is None:
        n_classes = k
    elif k > n_classes:
        raise TopoCAMError(f"{where}: label {k - 1} is out of range for {n_classes} classes")
    if n_classes < 2:
        raise TopoCAMError(f"{where}: need at least 2 classes, found labels {sorted(set(ys['train'].tolist()))}")
    absent = sorted(set(range(n_classes)) - set(ys["train"].tolist()))
    if absent:
        raise TopoCAMError(f"{where}: class(es) {absent} never occur in the training split")
    return xs, ys, n_classes


def _hash_arrays(xs: dict[str, np.ndarray], ys: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for s in SPLITS:
        for lo in range(0, len(xs[s]), 256):  # the float32 bytes, a chunk at a time (Images are never whole)
            h.update(images_in(xs[s], lo, lo + 256).tobytes())
        h.update(np.ascontiguousarray(ys[s]).tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ MedMNIST


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or Path.home() / ".medmnist")


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _medmnist_info(flag: str) -> dict:
    from medmnist import INFO

    return INFO[flag]


def medmnist_names() -> list[str]:
    from medmnist import INFO

    return sorted(k for k, v in INFO.items() if not v["task"].startswith("multi-label"))


def medmnist_file(flag: str, size: int) -> str:
    return f"{flag}{'' if size == 28 else f'_{size}'}.npz"


def _try_download(url: str, folder: Path, filename: str, md5: str) -> str | None:
    """Download with the library medmnist itself uses; return an error text or None."""
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        return f"downloads disabled by {OFFLINE_ENV}"
    from torchvision.datasets.utils import download_url

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        download_url(url, root=str(folder), filename=filename, md5=md5)
        return None
    except Exception as exc:  # network errors come in many types; all mean "not downloadable now"
        partial = folder / filename
        if partial.exists() and _md5(partial) != md5:
            partial.unlink()
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    finally:
        socket.setdefaulttimeout(old)


def load_medmnist(flag: str, size: int = 28, data_dir: str | Path | None = None) -> Dataset:
    flag = flag.lower()
    check_dataset(flag, size)
    info = _medmnist_info(flag)
    sfx = "" if size == 28 else f"_{size}"
    url, md5 = info[f"url{sfx}"], info[f"MD5{sfx}"]
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    fname = medmnist_file(flag, size)
    path = folder / fname
    if not path.exists():
        why = _try_download(url, folder, fname, md5)
        if why is not None or not path.exists():
            raise TopoCAMError(
                f"{fname} is not in {folder} and could not be downloaded ({why}). "
                f"Download it from {url} (MD5 {md5}), put it in {folder}, "
                f"or point --data-dir / {DATA_DIR_ENV} at the folder that holds it"
            )
    got = _md5(path)
    if got != md5:
        raise TopoCAMError(
            f"{path}: MD5 {got} does not match medmnist's published {md5}; the file is corrupt or "
            f"not the official one, delete it and download it again from {url}"
        )
    arrays = _read_npz(path)
    xs, ys, k = validate_arrays(arrays, str(path), n_classes=len(info["label"]))
    task = "binary-class" if info["task"] == "binary-class" else "multi-class"
    names_ = [info["label"][str(i)] for i in range(k)]
    return Dataset(flag, task, k, xs, ys, fingerprint=f"{flag}{sfx}-{md5[:12]}", source=str(path), class_names=names_)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile/pickle/ValueError: all mean "not a readable npz"
        raise TopoCAMError(f"{path}: cannot read as .npz ({type(exc).__name__}: {exc})") from None


def load_npz(path: str | Path) -> Dataset:
    """A user's own data in the MedMNIST npz layout (no MD5 check)."""
    path = Path(path)
    if not path.is_file():
        raise TopoCAMError(f"dataset file {path} does not exist")
    xs, ys, k = validate_arrays(_read_npz(path), str(path))
    task = "binary-class" if k == 2 else "multi-class"
    return Dataset(path.stem, task, k, xs, ys, fingerprint=f"{path.stem}-{_hash_arrays(xs, ys)}", source=str(path))


# ----------------------------------------------------------------- synthetic


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape), sigma)
    return (f - f.min()) / (np.ptp(f) + 1e-12)


def _ball(shape: tuple[int, ...], center: np.ndarray, radius: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d2 = sum((g - c) ** 2 for g, c in zip(grids, center))
    return d2 <= radius**2


SYNTHETIC_VERSION = "3"  # recorded in the source text; the fingerprint hashes the images themselves
LESION_RADIUS = (0.17, 0.21)  # fraction of the side: the lesion is the LARGEST object...
CLUTTER_RADIUS = (0.10, 0.13)  # ...distractors are smaller: size, not topology or intensity, tells them apart
BRIGHT = (0.7, 1.0)  # every object, lesion or clutter, draws its intensity from the same range
DARK = (0.05, 0.2)  # and so does every hole


def holed_objects(clutter: int) -> int:
    """How many of the 1 + ``clutter`` objects have a hole, whatever the label."""
    return max(1, (clutter + 1) // 2)


def hole_halfwidth(size: int) -> int:
    """Every hole is the same cube of (2k+1)^d pixels, whichever object holds it: the
    hole a lesion has or lacks is the hole a distractor lacks or has, so both classes
    have the same bright and dark areas."""
    return max(0, int(0.05 * size))


def _radii(rng: np.random.Generator, size: int, ndim: int, clutter: int) -> list[float]:
    """Lesion radius first, then the distractors'. Any object can hold a hole, so its ball
    must contain the (2k+3)^d cube around the hole: the hole is then closed in any
    connectivity (26-connected voxels leak through the corners of a thinner ring)."""
    floor = (hole_halfwidth(size) + 1) * np.sqrt(ndim) + 0.1
    small = [max(rng.uniform(*CLUTTER_RADIUS) * size, floor) for _ in range(clutter)]
    big = max(rng.uniform(*LESION_RADIUS) * size, floor + 1.0, max(small) + 1.0)
    return [big, *small]


def _layout(rng: np.random.Generator, size: int, ndim: int, clutter: int) -> tuple[list[float], list[np.ndarray]]:
    """Radii (lesion first) and integer centres, inside the image and with background
    between the objects (objects touching, even diagonally, would merge and change the
    topology). Radii are redrawn with each attempt, so a crowded draw does not get stuck."""
    for _ in range(500):  # cheap: a failed layout costs microseconds
        radii = _radii(rng, size, ndim, clutter)
        centres: list[np.ndarray] = []
        for r in radii:
            lo, hi = int(np.ceil(r + 1)), int(np.floor(size - 2 - r))
            if hi < lo:
                break
            for _ in range(30):
                c = rng.integers(lo, hi + 1, size=ndim).astype(float)
                if all(np.linalg.norm(c - c2) > r + r2 + 1.5 for c2, r2 in zip(centres, radii)):
                    centres.append(c)
                    break
            else:
                break
        if len(centres) == len(radii):
            return radii, centres
    raise TopoCAMError(
        f"cannot place the lesion and {clutter} distractor(s) apart in a {size}-px image; lower clutter or raise size"
    )


def synthetic_image(
    rng: np.random.Generator, ndim: int, size: int, label: int, clutter: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """One image and its lesion mask: the lesion as drawn, so a holed lesion's mask has
    its hole (beta = (1, 1) in 2D, (1, 0, 1) in 3D) and a solid one's has none; the
    ROI-quality Betti error is measured against it.

    The premise of TopoCAM, by construction: the image holds the lesion (the
    largest object) and ``clutter`` smaller distractors, all drawn from the same
    intensity ranges, and the number of objects with a hole is the same for
    both labels (:func:`holed_objects`), every hole the same size. Label 1: the
    lesion has the hole (2D) or cavity (3D); label 0: the lesion is solid and one
    more distractor has a hole. So the whole image's topology is the same in
    distribution for both classes and only the lesion's topology tells them
    apart; a CNN finds the lesion by its size. ``clutter`` is the difficulty knob."""
    if clutter < 1:
        raise TopoCAMError(f"synthetic clutter must be >= 1 (the distractors carry the hole a solid lesion lacks), got {clutter}")
    shape = (size,) * ndim
    img = 0.15 * _smooth_noise(rng, shape, sigma=size / 8)
    radii, centres = _layout(rng, size, ndim, clutter)
    n_holed_clutter = holed_objects(clutter) - (1 if label == 1 else 0)
    holed = [label == 1] + list(rng.permutation([True] * n_holed_clutter + [False] * (clutter - n_holed_clutter)))
    k = hole_halfwidth(size)
    bright = np.zeros(shape, dtype=bool)
    lesion = np.zeros(shape, dtype=bool)
    for j, (c, r, hole) in enumerate(zip(centres, radii, holed)):
        ball = _ball(shape, c, r)
        img[ball] = rng.uniform(*BRIGHT)
        bright |= ball
        if hole:
            cube = tuple(slice(int(ci) - k, int(ci) + k + 1) for ci in c)
            img[cube] = rng.uniform(*DARK)
            bright[cube] = False
        if j == 0:  # the lesion as drawn, its hole included: the topology an ROI should recover
            lesion = bright.copy()
    # pixel noise on the background and in the holes, not on the bright objects: noise inside a
    # thin wall (a distractor's) makes short-lived features that a thick wall (the lesion's) does
    # not, which would let the whole image's topology tell which object holds the hole
    noise = rng.normal(0.0, 0.03, size=shape)
    img[~bright] += noise[~bright]
    return np.clip(img, 0.0, 1.0).astype(np.float32), lesion


def make_synthetic(
    ndim: int, size: int = 28, n: tuple[int, int, int] = DEFAULT_SYNTHETIC_N, seed: int = 0, clutter: int = 2
) -> Dataset:
    """Balanced, seeded synthetic dataset with ground-truth lesion masks.
    ``seed`` is the DATA seed: models vary their own seeds on these fixed images."""
    if ndim not in (2, 3):
        raise TopoCAMError(f"synthetic data is 2D or 3D, not {ndim}D")
    check_dataset(f"synthetic{ndim}d", size)
    if min(n) < 2:
        raise TopoCAMError(f"each synthetic split needs at least 2 images, got {n}")
    rng = np.random.default_rng(seed)
    xs, ys, ms = {}, {}, {}
    for split, count in zip(SPLITS, n):
        labels = np.arange(count) % 2
        rng.shuffle(labels)
        pairs = [synthetic_image(rng, ndim, size, int(lab), clutter) for lab in labels]
        xs[split] = np.stack([p[0] for p in pairs])[:, None]
        ms[split] = np.stack([p[1] for p in pairs])
        ys[split] = labels.astype(np.int64)
    name = f"synthetic{ndim}d"
    src = f"{name}(size={size}, n={n}, seed={seed}, clutter={clutter}, generator v{SYNTHETIC_VERSION})"
    # by content: a change to the generator can never reuse checkpoints or CAMs of other images
    fp = f"{name}-{_hash_arrays(xs, ys)}"
    return Dataset(name, "binary-class", 2, xs, ys, fingerprint=fp, source=src, lesion_masks=ms,
                   class_names=["solid lesion", "lesion with hole/cavity"])


def _is_path(name: str) -> bool:
    """An .npz, anything with a separator, or a folder holding an import's dataset.json
    (a folder named like a MedMNIST set, without it, does not shadow the set)."""
    return name.lower().endswith(".npz") or os.sep in name or (Path(name) / "dataset.json").is_file()


def load_imported(folder: str | Path) -> Dataset:
    """A folder written by ``topocam data import``: its data.npz, with the class names
    and preprocessing settings of its dataset.json."""
    from .imports import read_dataset_meta

    folder = Path(folder)
    meta = read_dataset_meta(folder)
    ds = load_npz(folder / "data.npz")
    return dataclasses.replace(ds, name=folder.name, source=str(folder), class_names=list(meta.get("class_names", [])),
                               preprocessing=meta.get("preprocessing"))


def check_dataset(name: str, size: int) -> None:
    """A known dataset name (or an .npz path, checked when read) at a size it can
    have: a MedMNIST size, or a synthetic side within SYNTHETIC_SIZE_RANGE."""
    key = name.lower()
    if key in SYNTHETIC:
        lo, hi = SYNTHETIC_SIZE_RANGE[int(key[9])]
        if not lo <= size <= hi:
            raise TopoCAMError(f"size {size} is out of range for {key}: synthetic images need {lo} <= size <= {hi}")
        return
    if _is_path(name):
        return
    names = medmnist_names()
    if key not in names:
        raise TopoCAMError(
            f"unknown dataset {key!r}; choose a MedMNIST set ({', '.join(names)}), "
            f"{' or '.join(SYNTHETIC)}, a path to an .npz file, or a folder written by `topocam data import`"
        )
    if size not in MEDMNIST_SIZES:
        raise TopoCAMError(f"size {size} is not a MedMNIST size; choose one of {MEDMNIST_SIZES}")


def load_dataset(
    name: str,
    size: int = 28,
    data_dir: str | Path | None = None,
    synthetic_n: tuple[int, int, int] = DEFAULT_SYNTHETIC_N,
    seed: int = 0,
    clutter: int = 2,
) -> Dataset:
    """Resolve a dataset by name: synthetic2d/3d, a MedMNIST flag, or an .npz path.
    ``seed`` and ``clutter`` (the data seed and difficulty) apply to synthetic sets only."""
    key = name.lower()
    if key in SYNTHETIC:
        return make_synthetic(int(key[9]), size=size, n=synthetic_n, seed=seed, clutter=clutter)
    if _is_path(name):
        return load_imported(name) if Path(name).is_dir() else load_npz(name)
    return load_medmnist(key, size=size, data_dir=data_dir)
