"""How many images are held at once: the one setting that bounds memory by
itself, not by the size of the data.

The feature stage, which used to hold whole splits at full resolution
(upsampled per-layer maps, fused maps, ROIs, float64 filtrations), now works
through a split a chunk of images at a time, each chunk at most
``TOPOCAM_CHUNK_VOXELS`` input voxels (default 4M: 16 volumes at 64^3, 191 at
28^3, 5,349 images at 28^2). Every feature is the same bit for bit whatever the
chunk (tests/test_memory.py), so the setting trades memory for per-chunk
overhead only. The backbone's inference and BatchNorm-recalibration batches
(settings ``infer_batch``, ``bn_batch``) default to the images a chunk holds, at
most 128 (``backbone.default_batch``); CAMs run at the smaller of 64 and the
inference batch. Those batches decide the backbone and its CAMs (on a CPU an
image's outputs can differ in the last bit between batch sizes), so they are in
the backbone's cache key wherever they differ from the 128 of every 28-px key.
"""

from __future__ import annotations

import math
import os

from .errors import TopoCAMError

CHUNK_ENV = "TOPOCAM_CHUNK_VOXELS"
DEFAULT_CHUNK_VOXELS = 4 * 2**20


def chunk_voxels() -> int:
    """``TOPOCAM_CHUNK_VOXELS`` (unset: the default), or a TopoCAMError naming it."""
    raw = os.environ.get(CHUNK_ENV, "").strip()
    if not raw:
        return DEFAULT_CHUNK_VOXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise TopoCAMError(f"{CHUNK_ENV} must be a whole number of voxels >= 1 (default {DEFAULT_CHUNK_VOXELS}), got {raw!r}")
    return value


def images_per_chunk(shape: tuple[int, ...], cap: int | None = None) -> int:
    """Images of ``shape`` (spatial) in one chunk: at least 1, at most ``cap``."""
    n = max(1, chunk_voxels() // max(1, math.prod(shape)))
    return min(n, cap) if cap else n


def chunks(n: int, per: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges covering ``range(n)`` in steps of ``per``."""
    return [(lo, min(n, lo + per)) for lo in range(0, n, per)]
