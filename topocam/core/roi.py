"""A_{w,tau}: fuse the per-layer CAMs, threshold at tau (or let another ROI generator
draw the ROI: ``roi = prompted | segmenter``), mask the input.

M = sum_l w_l H_l, with each H_l upsampled (bilinear / trilinear) to the input
grid and min-max normalised to [0, 1], and w on the simplex; ROI = M >= tau;
segmented input X' = X inside the ROI, and outside it 0 (``outside="zero"``,
the paper's: those voxels enter the filtration first) or +inf
(``outside="exclude"``: they never enter it).

:class:`RoiSelector` is that stage with its own settings only; training,
inference and the figures all take their ROIs from it (:class:`WholeImage` is
Topo-Original's: every voxel). Also the ROI-quality measures used against
ground-truth lesions (:func:`quality`: Dice, IoU, the pointing game, the Betti error).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .cam import CAM_LAYERS, normalise_maps
from .errors import TopoCAMError
from .prompted import PromptRecipe, Prompter, RandomWalker, load_sam, prompted_masks
from .segmenter import betti_numbers_batch
from .settings import SETTINGS

UPSAMPLED_CACHE_ENV = "TOPOCAM_ROI_CACHE_MB"  # memory for cached upsampled maps, per context
# AdrenalMNIST3D 28^3: 339 MB per CAM variant for train + val (a study trial's splits), so two
# variants stay cached; at 64^3 a layer of train is 1.25 GB: not kept, streamed a chunk at a time
DEFAULT_UPSAMPLED_CACHE_MB = 1024


def fusion_weights(raw: Sequence[float]) -> np.ndarray:
    """Validate raw non-negative weights and put them on the simplex."""
    w = np.asarray(raw, dtype=np.float64).reshape(-1)
    if w.size != len(CAM_LAYERS):
        raise TopoCAMError(f"need {len(CAM_LAYERS)} fusion weights (one per {', '.join(CAM_LAYERS)}), got {w.size}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise TopoCAMError(f"fusion weights must be finite and non-negative, got {list(raw)}")
    if w.sum() <= 0:
        raise TopoCAMError("fusion weights are all zero; at least one layer needs a positive weight")
    return w / w.sum()


def check_tau(tau: float) -> float:
    """tau as its setting declares it (a number in [0, 1])."""
    return SETTINGS["tau"].check(tau)


def upsample_normalised(maps: np.ndarray, shape: tuple[int, ...], chunk: int = 256) -> np.ndarray:
    """H_l of one layer: its maps (n, *native) upsampled (bilinear / trilinear,
    ``align_corners=False``) to ``shape`` and min-max normalised to [0, 1] per
    image (a constant map becomes zeros); (n, *shape) float32.

    Done in chunks of images (each output voxel depends on its own image only,
    so chunking and the thread count do not change a single bit)."""
    n = len(maps)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    out = np.empty((n, *shape), dtype=np.float32)
    flat_out = out.reshape(n, -1)
    for i in range(0, n, chunk):
        # np.array copies: the in-place normalisation below never touches the caller's maps
        h = torch.from_numpy(np.array(maps[i : i + chunk], dtype=np.float32)).unsqueeze(1)
        if tuple(h.shape[2:]) != tuple(shape):
            h = F.interpolate(h, size=shape, mode=mode, align_corners=False)
        flat_out[i : i + chunk] = normalise_maps(h.reshape(h.shape[0], -1), inplace=True).numpy()  # CPU tensor: upsampled here
    return out


def fuse_upsampled(layers: Sequence[np.ndarray | None], weights: np.ndarray) -> np.ndarray:
    """M = sum_l w_l H_l from the layers' upsampled, normalised maps (in
    CAM_LAYERS order; None where the weight is 0), (n, *shape) float32.
    The same arithmetic as summing ``float32(w_l) * H_l`` in layer order into
    zeros, bit for bit (the first term needs no addition: 0 + x == x)."""
    out = tmp = None
    for h, w in zip(layers, weights):
        if w == 0:
            continue
        if out is None:
            out = np.multiply(h, np.float32(w), dtype=np.float32)
        else:
            tmp = np.multiply(h, np.float32(w), out=tmp, dtype=np.float32)
            out += tmp
    if out is None:
        raise TopoCAMError("fusion weights are all zero; at least one layer needs a positive weight")
    return out


def upsampled_cache_bytes() -> int:
    """The budget from ``TOPOCAM_ROI_CACHE_MB`` (MiB; unset: the default), or a
    TopoCAMError naming the variable and its value."""
    raw = os.environ.get(UPSAMPLED_CACHE_ENV, "").strip()
    if not raw:
        return DEFAULT_UPSAMPLED_CACHE_MB * 2**20
    try:
        mb = float(raw)
    except ValueError:
        mb = float("nan")
    if not (mb >= 0 and mb != float("inf")):
        raise TopoCAMError(
            f"{UPSAMPLED_CACHE_ENV} must be a number of MiB >= 0 (0 turns the cache off; default "
            f"{DEFAULT_UPSAMPLED_CACHE_MB}), got {raw!r}"
        )
    return int(mb * 2**20)


class UpsampledCache:
    """Memory-bounded LRU of upsampled, normalised per-layer maps H_l.

    H_l depends on the CAM variant, the split and the layer, never on w or
    tau; so after the first trial with a variant, a trial only sums and
    thresholds. Values are stored read-only and returned as they were
    computed, so the cache can save time but never change a result. Entries
    larger than the budget are not kept (the pipeline does not even build them:
    64^3 volumes under the default budget, 1.25 GB per layer of AdrenalMNIST3D's
    train split, are streamed in chunks). The budget is ``TOPOCAM_ROI_CACHE_MB``
    (MiB, default 1024; 0 turns the cache off).
    Thread-safe (two threads missing the same key both compute it)."""

    def __init__(self, max_bytes: int | None = None):
        if max_bytes is None:
            max_bytes = upsampled_cache_bytes()
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, compute: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        value = compute()
        if value.nbytes <= self.max_bytes:
            value.setflags(write=False)  # shared by trials: nobody may change it in place
            with self._lock:
                self._items.pop(key, None)  # another thread may have stored it meanwhile
                used = sum(a.nbytes for a in self._items.values())
                while self._items and used + value.nbytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    used -= old.nbytes
                self._items[key] = value
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def check_tau_mode(mode: str) -> str:
    return SETTINGS["tau_mode"].check(mode)


def roi_masks(fused: np.ndarray, tau: float, mode: str = "absolute") -> np.ndarray:
    """ROI = M >= tau (the paper), or M / max(M) >= tau per image (``relative``): a fused
    map whose layers peak apart, or with a dead (constant) layer, never reaches an
    absolute tau and gives an empty ROI; relative to its own maximum it cannot be
    empty unless the whole map is zero."""
    tau = check_tau(tau)
    if check_tau_mode(mode) == "absolute":
        return fused >= tau
    peak = fused.reshape(len(fused), -1).max(axis=1).reshape(-1, *([1] * (fused.ndim - 1)))
    return (fused >= tau * peak) & (peak > 0)


def dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image Dice between boolean masks (1 when both are empty)."""
    p = pred.reshape(len(pred), -1)
    t = truth.reshape(len(truth), -1)
    inter = (p & t).sum(axis=1)
    denom = p.sum(axis=1) + t.sum(axis=1)
    return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)


def iou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image intersection over union of boolean masks (1 when both are empty)."""
    p = pred.reshape(len(pred), -1)
    t = truth.reshape(len(truth), -1)
    inter = (p & t).sum(axis=1)
    union = (p | t).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def betti_error(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per image, sum_k |beta_k(ROI) - beta_k(lesion)|: the quantity a topology-preserving
    segmentation loss drives down. (n,) int."""
    return np.abs(betti_numbers_batch(pred) - betti_numbers_batch(truth)).sum(axis=1)


def pointing_game(fused: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per image: does the map's maximum fall inside the true lesion?"""
    flat = fused.reshape(len(fused), -1)
    idx = flat.argmax(axis=1)
    return truth.reshape(len(truth), -1)[np.arange(len(truth)), idx]


def quality(heat: np.ndarray, masks: np.ndarray, truth: np.ndarray, seed: int = 0) -> dict[str, float]:
    """ROI quality against the true lesion masks, the one definition every generator,
    ``metrics.json``, MLflow and the ``roi_quality`` figure use: mean Dice, IoU, the
    pointing game of the generator's map (``heat``: the fused CAM, or a segmenter's
    foreground probability), the Betti error (and per dimension), with their chance
    levels (a random mask of the same size per image; the lesion's share of the image)."""
    truth = np.asarray(truth, dtype=bool)
    rand = random_masks_like(masks, np.random.default_rng(seed))
    db = np.abs(betti_numbers_batch(masks) - betti_numbers_batch(truth))
    out = {
        "dice": float(dice(masks, truth).mean()),
        "iou": float(iou(masks, truth).mean()),
        "pointing_game": float(pointing_game(heat, truth).mean()),
        "betti_error": float(db.sum(axis=1).mean()),
        **{f"betti_error_b{k}": float(db[:, k].mean()) for k in range(db.shape[1])},
        "dice_random_same_size": float(dice(rand, truth).mean()),
        "pointing_game_random": float(truth.reshape(len(truth), -1).mean()),
        "roi_fraction": float(masks.mean()),
    }
    return out


def random_masks_like(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random masks with exactly the same voxel count per image (the chance baseline)."""
    flat = masks.reshape(len(masks), -1)
    out = np.zeros_like(flat)
    for i, k in enumerate(flat.sum(axis=1)):
        out[i, rng.choice(flat.shape[1], size=int(k), replace=False)] = True
    return out.reshape(masks.shape)


def check_outside(outside: str) -> None:
    SETTINGS["outside"].check(outside)


def segment(images: np.ndarray, masks: np.ndarray, outside: str) -> np.ndarray:
    """Filtration values of X' = X (.) mask, float64, same shape as ``images``."""
    check_outside(outside)
    images = np.asarray(images)
    masks = np.asarray(masks, dtype=bool)
    if images.shape != masks.shape:
        raise TopoCAMError(f"images {images.shape} and ROI masks {masks.shape} differ in shape")
    out = np.full(images.shape, 0.0 if outside == "zero" else np.inf, dtype=np.float64)
    np.copyto(out, images, where=masks)  # one float64 array, no float64 copy of the whole input first
    return out


LayerMaps = Callable[[str], np.ndarray]  # CAM layer name -> H_l of the images at hand, (n, *shape) float32


class MaskModel(Protocol):
    """A fitted segmentation network (``core.segmenter.Segmenter``): images (n, *spatial)
    -> foreground probability and masks in the images' geometry."""

    def predict_proba(self, images: np.ndarray) -> np.ndarray: ...

    def masks(self, images: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class RoiSelector:
    """The ROI stage, knowing only its own settings: the CAM variant whose maps it fuses,
    the raw fusion weights (put on the simplex here), tau, how tau applies
    (``tau_mode``), what the segmented input holds outside the ROI, and the ROI
    generator (``roi``): ``threshold``, A_{w,tau} (M >= tau, the paper's);
    ``prompted``, a promptable segmenter prompted by M (``core.prompted``; the recipe
    in ``prompt``, the segmenter in ``prompter``); ``segmenter``, the masks of a
    trained segmentation network (``mask_model``, fitted by the caller on the
    training split). It works on whatever images it is handed, a chunk at a time;
    where the maps, the images and the network come from is the caller's."""

    cam: str = SETTINGS["cam"].default
    weights: tuple[float, ...] = SETTINGS["weights"].default
    tau: float = SETTINGS["tau"].default
    tau_mode: str = SETTINGS["tau_mode"].default
    outside: str = SETTINGS["outside"].default
    roi: str = SETTINGS["roi"].default
    prompt: PromptRecipe = PromptRecipe()
    prompter: str = SETTINGS["prompter"].default
    sam_checkpoint: str | None = None
    sam_model: str = SETTINGS["sam_model"].default
    mask_model: MaskModel | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, cfg, mask_model: MaskModel | None = None) -> "RoiSelector":
        """The selector of a configuration (a ``TopoCAMConfig``); ``roi = segmenter``
        needs its fitted network (``mask_model``)."""
        if cfg.roi == "segmenter" and mask_model is None:
            raise TopoCAMError("roi=segmenter needs the segmenter trained on the training split's lesion masks "
                               "(topocam.core.pipeline.selector_for builds it)")
        return cls(cfg.cam, tuple(cfg.weights), cfg.tau, cfg.tau_mode, cfg.outside, cfg.roi, cfg.prompt_recipe(),
                   cfg.prompter, cfg.sam_checkpoint, cfg.sam_model, mask_model if cfg.roi == "segmenter" else None)

    @property
    def generator(self) -> str:
        """The ROI generator as tables name it: threshold, prompted (rw | sam), segmenter (its loss)."""
        if self.roi == "prompted":
            return f"prompted ({self.prompter})"
        if self.roi == "segmenter":
            loss = getattr(getattr(self.mask_model, "info", None), "loss", None)
            return f"segmenter ({loss})" if loss else "segmenter"
        return self.roi

    @property
    def needs_images(self) -> bool:
        """Whether the ROI depends on the images themselves, not only on the CAMs."""
        return self.roi != "threshold"

    def _prompter(self) -> Prompter:
        if self.prompter == "sam":
            if not self.sam_checkpoint:
                raise TopoCAMError("prompter=sam needs sam_checkpoint (--sam-checkpoint FILE: SAM ViT-B or MedSAM weights)")
            return load_sam(self.sam_checkpoint, self.sam_model)
        return RandomWalker()

    @property
    def fusion(self) -> np.ndarray:
        return fusion_weights(self.weights)

    def fuse(self, layer: LayerMaps) -> np.ndarray:
        """M = sum_l w_l H_l; ``layer`` is asked only for the layers whose weight is not 0."""
        w = self.fusion
        return fuse_upsampled([None if wl == 0 else layer(name) for name, wl in zip(CAM_LAYERS, w)], w)

    def masks(self, fused: np.ndarray) -> np.ndarray:
        """The threshold ROI M >= tau (``tau_mode``); the other generators: :meth:`transform`."""
        return roi_masks(fused, self.tau, self.tau_mode)

    def transform(self, layer: LayerMaps, images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The generator's map and the ROI masks of the images ``layer`` holds (``images``:
        those images, (n, *shape), where :attr:`needs_images`). The map is the fused CAM M,
        or for ``segmenter`` the network's foreground probability (what its pointing game
        and overlays show)."""
        if self.roi == "segmenter":
            if self.mask_model is None:
                raise TopoCAMError("roi=segmenter needs the segmenter trained on the training split's lesion masks")
            images = _need(images)
            return self.mask_model.predict_proba(images), self.mask_model.masks(images)
        fused = self.fuse(layer)
        if self.roi == "prompted":
            return fused, prompted_masks(_need(images), fused, self.prompt, self._prompter())
        return fused, self.masks(fused)

    def from_maps(self, maps: dict[str, np.ndarray], shape: tuple[int, ...],
                  images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`transform` of native-resolution CAMs (``CamBatch.maps``), upsampled to ``shape``."""
        return self.transform(lambda name: upsample_normalised(maps[name], shape), images)

    def segment(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """X' of the images: the filtration values phi reads."""
        return segment(images, masks, self.outside)


def _need(images: np.ndarray | None) -> np.ndarray:
    if images is None:
        raise TopoCAMError("this ROI generator segments the images themselves: pass them to RoiSelector.transform")
    return np.asarray(images)


@dataclass(frozen=True)
class WholeImage:
    """Topo-Original's "ROI": every voxel of the image (no CAM, no tau)."""

    outside: str = SETTINGS["outside"].default

    def transform(self, n: int, shape: tuple[int, ...]) -> tuple[None, np.ndarray]:
        return None, np.ones((n, *shape), dtype=bool)

    def segment(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
        return segment(images, masks, self.outside)
