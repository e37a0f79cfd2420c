"""On-disk cache of per-layer CAMs at native resolution, read memory-mapped.

The CAMs depend on the backbone checkpoint, the data and the target rule, and
not on the fusion weights, tau or the MLP; so they are computed once per CAM
variant and every trial reads them from here. Layout:

    <cache_dir>/cams/<key>/<variant>/<split>/{layer2,layer3,layer4,targets,probs}.npy

A variant's folder is written under a temporary name and renamed into place
(:func:`topocam.atomic.atomic_path`), so a cache entry is either complete or
absent; processes sharing the cache compute a variant once
(:func:`topocam.stores.load_or_build`), and a folder that cannot be read back
is named and recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .backbone import CAM_LAYERS
from .cam import CamBatch
from .locks import BadEntry, load_or_build

_CODE_VERSION = "1"  # bump when cam.py changes what a cached map means
_COMPLETE = "complete"  # written last into the temporary folder: its absence means a foreign or damaged folder



def cam_cache_key(backbone_key: str, data_fingerprint: str, rule: str) -> str:
    blob = json.dumps([backbone_key, data_fingerprint, rule, _CODE_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class CamStore:
    def __init__(self, cache_dir: Path, key: str):
        self.root = Path(cache_dir) / "cams" / key

    def _dir(self, variant: str) -> Path:
        return self.root / variant

    def has(self, variant: str) -> bool:
        return (self._dir(variant) / _COMPLETE).is_file()

    def save(self, variant: str, batches: dict[str, CamBatch]) -> None:
        with atomic_path(self._dir(variant)) as tmp:
            for split, b in batches.items():
                d = tmp / split
                d.mkdir(parents=True)
                for layer in CAM_LAYERS:
                    np.save(d / f"{layer}.npy", b.maps[layer].astype(np.float32))
                np.save(d / "targets.npy", b.targets)
                np.save(d / "probs.npy", b.probs)
            (tmp / _COMPLETE).write_text("ok\n")

    def ensure(self, variant: str, compute: Callable[[], dict[str, CamBatch]]) -> bool:
        """Make the variant's entry exist and read back whole; True if ``compute`` ran here.
        Several processes may call this at once: one computes, the others wait and reuse."""

        def build() -> bool:
            self.save(variant, compute())
            return True

        _, cached = load_or_build(self._dir(variant), lambda: self._check(variant), build)
        return not cached

    def _check(self, variant: str) -> bool | None:
        """True if every split reads back with consistent shapes, None if the entry is
        absent; :class:`BadEntry` otherwise. Cheap: maps are memory-mapped (their
        headers are parsed and their sizes checked, their values are not read)."""
        folder = self._dir(variant)
        if not folder.is_dir():
            return None
        if not (folder / _COMPLETE).is_file():
            raise BadEntry(f"no '{_COMPLETE}' marker")
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not splits:
            raise BadEntry("no split folders")
        for split in splits:
            self.load(variant, split)
        return True

    def load(self, variant: str, split: str) -> CamBatch:
        """One split's maps (memory-mapped), targets and probabilities; :class:`BadEntry`
        naming the file when one is truncated, unreadable or of the wrong length."""
        d = self._dir(variant) / split
        arrays: dict[str, np.ndarray] = {}
        for name in (*CAM_LAYERS, "targets", "probs"):
            path = d / f"{name}.npy"
            try:
                arrays[name] = np.load(path, mmap_mode="r" if name in CAM_LAYERS else None)
            except (OSError, ValueError, EOFError) as exc:  # numpy's words for a short or garbled .npy
                raise BadEntry.because(exc, str(path)) from exc
        n = len(arrays["targets"])
        wrong = [k for k, a in arrays.items() if a.ndim == 0 or len(a) != n]
        if wrong:
            raise BadEntry(f"{split}/{wrong[0]}.npy holds {arrays[wrong[0]].shape[:1]} images, targets.npy {n}")
        if not np.isfinite(arrays["probs"]).all():
            raise BadEntry(f"{split}/probs.npy holds non-finite values")
        return CamBatch(maps={layer: arrays[layer] for layer in CAM_LAYERS}, targets=arrays["targets"], probs=arrays["probs"])

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*.npy")) if self.root.exists() else 0
