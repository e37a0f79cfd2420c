"""The model a study's trials are scored on, as cache entries with content digests.

f_theta (the backbone checkpoint), its CNN probabilities and the per-layer maps of
A (one folder per CAM variant) are what every trial of a study reads; two machines
that train "the same" backbone get different weights (thread counts, instruction
sets, a GPU), so a distributed study must score all its trials on one copy. This
module names those cache entries (:func:`model_entries`, computable before anything
is trained), digests them (:func:`entry_digest`: SHA-256 of a file, or of a folder's
sorted file list and file digests) and checks a local entry against the digest a
study published (:func:`verify_entry`). Publishing and fetching them is the search
layer's (``topocam.search.artifacts``): the core knows nothing of MLflow or Optuna.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic import atomic_path
from .backbone import backbone_key, resolve_backbone
from .cache import cam_cache_key
from .data import Dataset
from .errors import TopoCAMError
from .settings import TopoCAMConfig

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Artifact:
    """One cache entry of a study's model: its path under the cache folder (``backbones/<key>.pt``,
    ``backbones/<key>.probs.npz``, ``cams/<key>/<variant>``), SHA-256 and size in bytes."""

    entry: str
    sha256: str
    bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelEntries:
    """The cache entries one model seed's context reads: backbone, CNN probabilities, CAM variants."""

    seed: int
    backbone: str
    probs: str
    cams: dict[str, str]  # variant -> entry

    @property
    def all(self) -> list[str]:
        return [self.backbone, self.probs, *self.cams.values()]


def model_entries(config: TopoCAMConfig, data: Dataset, variants: tuple[str, ...]) -> ModelEntries:
    """The entries :func:`pipeline.prepare` and ``Context.cams`` read for ``config`` (its model seed)
    on ``data``, named from the same keys they use, without training anything."""
    arch = resolve_backbone(config.backbone, data.ndim)
    key = backbone_key(data, config.train_settings(), arch)
    cam_key = cam_cache_key(key, data.fingerprint, config.cam_target)
    return ModelEntries(config.seed, f"backbones/{key}.pt", f"backbones/{key}.probs.npz",
                        {v: f"cams/{cam_key}/{v}" for v in variants})


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def entry_digest(path: Path) -> tuple[str, int]:
    """(SHA-256, bytes) of a file, or of a folder: the digest of its sorted ``relative-path sha256``
    lines, so two copies of a CAM folder agree exactly when every file does, wherever they lie."""
    path = Path(path)
    if path.is_file():
        return _file_sha(path), path.stat().st_size
    files = sorted(p for p in path.rglob("*") if p.is_file())
    lines = "".join(f"{p.relative_to(path).as_posix()} {_file_sha(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest(), sum(p.stat().st_size for p in files)


def digest(cache_dir: Path, entry: str) -> Artifact:
    sha, size = entry_digest(Path(cache_dir) / entry)
    return Artifact(entry, sha, size)


def verify_entry(cache_dir: Path, expected: Artifact, where: str = "the published one") -> bool:
    """True if the local entry exists and has the expected digest, False if it is absent; a local
    entry that disagrees is a TopoCAMError naming both digests (never silently replaced: trials
    scored on it would be mixed with trials scored on the published model)."""
    path = Path(cache_dir) / expected.entry
    if not path.exists():
        return False
    got = digest(cache_dir, expected.entry)
    if got.sha256 != expected.sha256:
        raise TopoCAMError(
            f"local cache entry {path} has sha256 {got.sha256[:16]}… ({got.bytes} bytes), {where} "
            f"{expected.sha256[:16]}… ({expected.bytes} bytes): it is another model; move it aside (or use another "
            "--cache-dir / TOPOCAM_CACHE_DIR) and the published one is fetched"
        )
    return True


def install_entry(cache_dir: Path, expected: Artifact, source: Path) -> None:
    """Move a downloaded copy into the cache, after checking its digest; atomic (the entry
    appears whole by one rename or not at all). A copy that disagrees is a TopoCAMError
    naming both digests, and the cache is left as it was."""
    got_sha, got_bytes = entry_digest(source)
    if got_sha != expected.sha256:
        raise TopoCAMError(
            f"the downloaded copy of {expected.entry} has sha256 {got_sha[:16]}… ({got_bytes} bytes), "
            f"the study recorded {expected.sha256[:16]}… ({expected.bytes} bytes): the store holds a damaged artifact"
        )
    target = Path(cache_dir) / expected.entry
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.move(str(source), str(tmp))
