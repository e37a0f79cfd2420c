"""On-disk cache of per-layer CAMs at native resolution, read memory-mapped.

The CAMs depend on the backbone checkpoint, the data and the target rule, and
not on the fusion weights, tau or the MLP; so they are computed once per CAM
variant and every trial reads them from here. Layout:

    <cache_dir>/cams/<key>/<variant>/<split>/{layer2,layer3,layer4,targets,probs}.npy

A variant's folder is written under a temporary name and renamed into place,
so a cache entry is either complete or absent. An entry damaged later (a file
truncated, removed or replaced by one of another length) is not read as if it
were whole: :meth:`CamStore.load` raises :class:`CorruptCamCache`, and
:meth:`topocam.pipeline.Context.cams` then discards the entry and recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .backbone import CAM_LAYERS
from .cam import CamBatch
from .errors import TopoCAMError

_CODE_VERSION = "1"  # bump when cam.py changes what a cached map means


class CorruptCamCache(TopoCAMError):
    """A complete-marked cache entry whose files cannot be read as one batch of maps."""

    def __init__(self, damage: str, entry: Path):
        super().__init__(f"{damage}; delete {entry} to recompute it")
        self.damage = damage  # what is wrong, without the advice


def cam_cache_key(backbone_key: str, data_fingerprint: str, rule: str) -> str:
    blob = json.dumps([backbone_key, data_fingerprint, rule, _CODE_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class CamStore:
    def __init__(self, cache_dir: Path, key: str):
        self.root = Path(cache_dir) / "cams" / key

    def _dir(self, variant: str) -> Path:
        return self.root / variant

    def has(self, variant: str) -> bool:
        return (self._dir(variant) / "complete").is_file()

    def save(self, variant: str, batches: dict[str, CamBatch]) -> None:
        final = self._dir(variant)
        tmp = final.with_name(f".{variant}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for split, b in batches.items():
            d = tmp / split
            d.mkdir(parents=True)
            for layer in CAM_LAYERS:
                np.save(d / f"{layer}.npy", b.maps[layer].astype(np.float32))
            np.save(d / "targets.npy", b.targets)
            np.save(d / "probs.npy", b.probs)
        (tmp / "complete").write_text("ok\n")
        if final.exists():  # another process finished first: identical content, keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return
        os.replace(tmp, final)

    def load(self, variant: str, split: str) -> CamBatch:
        """One split's maps (memory-mapped), targets and probabilities; :class:`CorruptCamCache`
        when a file is missing, truncated or of another length than the rest."""
        d = self._dir(variant) / split
        try:
            maps = {layer: np.load(d / f"{layer}.npy", mmap_mode="r") for layer in CAM_LAYERS}
            targets, probs = np.load(d / "targets.npy"), np.load(d / "probs.npy")
        except (OSError, ValueError, EOFError) as exc:  # missing (OSError), truncated (ValueError, EOFError)
            raise CorruptCamCache(f"CAM cache {d} is damaged ({type(exc).__name__}: {exc})", self._dir(variant)) from None
        lengths = {**{layer: len(m) for layer, m in maps.items()}, "targets": len(targets), "probs": len(probs)}
        if len(set(lengths.values())) != 1:
            raise CorruptCamCache(f"CAM cache {d} is damaged (images per file differ: {lengths})", self._dir(variant))
        return CamBatch(maps=maps, targets=targets, probs=probs)

    def discard(self, variant: str) -> None:
        """Remove a variant's entry (a damaged one), so the next use recomputes it."""
        shutil.rmtree(self._dir(variant), ignore_errors=True)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*.npy")) if self.root.exists() else 0
