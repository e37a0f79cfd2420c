"""What an exported model accepts, and its conversion to the backbone's input.

An exported model takes a batch of images in MedMNIST's layout at the model's
size: ``(N, H, W)`` for 2D or ``(N, D, H, W)`` for 3D, optionally with a
trailing channel axis of 1 or 3. Intensities:

* unsigned 8-bit (numpy ``uint8``, or whole numbers 0..255 such as JSON
  integers) are divided by 255, exactly as MedMNIST's uint8 files are when a
  dataset is loaded (``data.py``); ``uint16`` is divided by 65535;
* floating point values must already lie in [0, 1].

Channels: a colour image given to a grayscale model is converted with the
ITU-R 601-2 luma weights (what Pillow's ``convert("L")`` does, in the same
integer arithmetic for 8-bit input); a grayscale image given to a colour model
is replicated to three channels.

The result is ``(N, C, *shape)`` float32 in [0, 1]: ``Dataset.x``'s layout.
Every rejection is a :class:`TopoCAMError` that says what is wrong.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ..core.errors import TopoCAMError
from ..core.scans import luma  # noqa: F401  (re-exported: the one ITU-R 601-2 luma)



@dataclass(frozen=True)
class InputSpec:
    """The images a model was trained on: spatial shape and channel count."""

    shape: tuple[int, ...]  # (H, W) or (D, H, W)
    channels: int  # 1 (grayscale) or 3

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def size_text(self) -> str:
        return "×".join(str(s) for s in self.shape)

    def layout(self) -> str:
        axes = "(N, H, W)" if self.ndim == 2 else "(N, D, H, W)"
        return f"{axes} = (N, {', '.join(str(s) for s in self.shape)})"

    def describe(self) -> str:
        kind = "2D images" if self.ndim == 2 else "3D volumes"
        return (
            f"a batch of {self.size_text()} {kind} shaped {self.layout()}, optionally with a trailing channel axis "
            "of 1 or 3; uint8 0-255 (or whole numbers 0-255) or floats in [0, 1]"
        )

    def as_dict(self) -> dict:
        return {"shape": list(self.shape), "channels": self.channels}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(tuple(int(s) for s in d["shape"]), int(d["channels"]))


def _numeric(images) -> np.ndarray:
    """A numeric ndarray from whatever arrived (ndarray, nested lists, an object
    array parsed from JSON), or a clear error."""
    if hasattr(images, "to_numpy") and hasattr(images, "columns"):
        raise TopoCAMError(
            "got a table (DataFrame); send the images as an array, e.g. a JSON body {\"inputs\": [image, ...]}"
        )
    try:
        arr = np.asarray(images)
    except ValueError:
        raise TopoCAMError("images must be a regular array of numbers; got nested lists of different lengths") from None
    if arr.ndim == 0:
        raise TopoCAMError(f"expected a batch of images (an array); got a single value {arr.item()!r}")
    if arr.dtype == object:
        flat = arr.reshape(-1)
        kinds = {type(v) for v in flat}
        if any(issubclass(k, (list, tuple, np.ndarray)) for k in kinds):
            raise TopoCAMError("images must be a regular array of numbers; got nested lists of different lengths")
        for i, v in enumerate(flat):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                where = np.unravel_index(i, arr.shape) if arr.ndim else ()
                raise TopoCAMError(
                    f"images must hold numbers only; found {v!r} ({type(v).__name__}) at index {list(map(int, where))}"
                )
        integral = all(isinstance(v, numbers.Integral) for v in flat)
        arr = np.array(flat.tolist(), dtype=np.int64 if integral else np.float64).reshape(arr.shape)
    if arr.dtype == bool:
        raise TopoCAMError("images must be numbers, not booleans (a mask?); send uint8 0-255 or floats in [0, 1]")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TopoCAMError(f"images must hold numbers (uint8 0-255 or floats in [0, 1]); got dtype {arr.dtype}")
    return arr


def _channels_last(arr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, *shape) or (N, *shape, C) -> (N, *shape, C), checking rank and size."""
    want = 1 + spec.ndim
    if tuple(arr.shape) in (spec.shape, (*spec.shape, 1), (*spec.shape, 3)):
        raise TopoCAMError(
            f"got a single image of shape {tuple(arr.shape)}; wrap it in a batch (a list of one image): expected {spec.describe()}"
        )
    if arr.ndim == want:
        arr = arr[..., None]
    elif not (arr.ndim == want + 1 and arr.shape[-1] in (1, 3)):
        raise TopoCAMError(
            f"wrong rank: got an array of shape {tuple(arr.shape)} ({arr.ndim} axes); expected {spec.describe()}"
        )
    if arr.shape[0] == 0:
        raise TopoCAMError("empty batch: send at least one image")
    if tuple(arr.shape[1:-1]) != spec.shape:
        got = "×".join(str(s) for s in arr.shape[1:-1])
        raise TopoCAMError(
            f"wrong size: images are {got}, this model takes {spec.size_text()} images (the size it was trained at); "
            "resize them first (topocam predict resizes image files)"
        )
    return arr


def _check_range(arr: np.ndarray) -> None:
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise TopoCAMError("images contain NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise TopoCAMError(
                f"float images must lie in [0, 1]; got values from {lo:g} to {hi:g} "
                "(send uint8 or whole numbers for the 0-255 scale)"
            )
    elif arr.dtype not in (np.uint8, np.uint16):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise TopoCAMError(f"integer images must lie in 0-255 (8-bit); got values from {lo} to {hi}")


def _to_unit(arr: np.ndarray) -> np.ndarray:
    """Intensities to float32 in [0, 1], with data.py's arithmetic for 8 and 16 bits."""
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.uint8).astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def as_batch(images, spec: InputSpec) -> np.ndarray:
    """Validate a batch and convert it to (N, C, *shape) float32 in [0, 1]."""
    arr = _channels_last(_numeric(images), spec)
    _check_range(arr)
    c = arr.shape[-1]
    if c == 3 and spec.channels == 1:
        arr = luma(arr)[..., None]
    elif c == 1 and spec.channels == 3:
        arr = np.repeat(arr, 3, axis=-1)
    x = _to_unit(arr)
    return np.ascontiguousarray(np.moveaxis(x, -1, 1))
