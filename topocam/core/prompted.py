"""A_prompted: the ROI a promptable segmenter draws when the fused CAM prompts it.

The zero-shot CAM-prompted recipe (issue 24): the hot region is the fused map M at or
above ``threshold`` times its maximum (the heat map taken on [0, 1]; a map that is all
zero prompts nothing and gives an empty ROI, which phi handles as any empty ROI); the
prompt is the hot region's box, padded by ``padding`` of the image side on every side
(clipped to the image), and ``points`` foreground points at M's highest local maxima
inside it. ``tries`` prompts are run, the first as drawn and the others with the box
edges and points moved by up to ``jitter`` of the side; the mask the segmenter is most
confident of is kept, then opened and closed (radius ``open_radius`` / ``close_radius``
voxels, a cross-shaped element) to drop specks and fill cracks thinner than the element.
Perturbations are seeded by the map's own bytes, so an image's ROI does not depend on
the chunk or the order it is processed in.

Two promptable segmenters (:data:`PROMPTERS`):

* ``rw``: scikit-image's random walker on the image, no weights, 2D and 3D: the points
  are foreground seeds, every voxel outside the padded box a background seed (where the
  box covers the image, the voxels where M is below a tenth of its maximum); confidence
  is the walker's mean certainty |2 p - 1| over the box.
* ``sam``: segment-anything's ``SamPredictor`` with the user's checkpoint (SAM or MedSAM;
  never downloaded, never replaced by ``rw``). SAM is 2D: a volume is prompted slice by
  slice along its first axis from the 3D map (each slice that holds part of the 3D hot
  region gets that part's box and peaks; the others are empty), and the stacked mask is
  opened and closed in 3D. Confidence is SAM's predicted IoU.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import TopoCAMError

PROMPTERS: tuple[str, ...] = ("rw", "sam")
SAM_MODELS: tuple[str, ...] = ("vit_b", "vit_l", "vit_h")
RW_BETA = 130.0  # scikit-image's default edge weight of the random walker
RW_BACKGROUND_FLOOR = 0.1  # where the box covers the image: background seeds where M < this * max(M)


@dataclass(frozen=True)
class PromptRecipe:
    """The recipe's constants (each a setting: ``prompt_threshold``, ``prompt_padding``, ...)."""

    threshold: float = 0.5
    padding: float = 0.1
    points: int = 3
    tries: int = 4
    jitter: float = 0.05
    open_radius: int = 1
    close_radius: int = 1


@dataclass(frozen=True)
class Prompt:
    """A box (``lo``, ``hi``: inclusive voxel corners, one per axis) and foreground points
    ((k, ndim) voxel indices), in the image's own array axes."""

    lo: np.ndarray
    hi: np.ndarray
    points: np.ndarray

    def box_mask(self, shape: tuple[int, ...]) -> np.ndarray:
        m = np.zeros(shape, dtype=bool)
        m[tuple(slice(int(a), int(b) + 1) for a, b in zip(self.lo, self.hi))] = True
        return m


def prompt_from_map(heat: np.ndarray, recipe: PromptRecipe, peak: float | None = None) -> Prompt | None:
    """The unperturbed prompt of one map (2D or 3D), or None where nothing is hot.
    ``peak``: the maximum the threshold is relative to (default the map's own; a slice of a
    volume passes the volume's)."""
    from skimage.feature import peak_local_max

    heat = np.asarray(heat, dtype=np.float64)
    top = float(heat.max()) if peak is None else float(peak)
    if not top > 0:
        return None
    hot = heat >= recipe.threshold * top
    if not hot.any():
        return None
    idx = np.argwhere(hot)
    shape = np.array(heat.shape)
    pad = np.ceil(recipe.padding * shape).astype(int)
    lo = np.maximum(idx.min(axis=0) - pad, 0)
    hi = np.minimum(idx.max(axis=0) + pad, shape - 1)
    pts = peak_local_max(np.where(hot, heat, 0.0), min_distance=1, num_peaks=recipe.points, labels=hot.astype(int),
                         exclude_border=False)
    if len(pts) == 0:  # a flat hot plateau has no strict local maximum: its first maximal voxel
        pts = np.array([np.unravel_index(int(np.argmax(heat)), heat.shape)])
    return Prompt(lo, hi, np.asarray(pts, dtype=int))


def perturbed(prompt: Prompt, shape: tuple[int, ...], jitter: float, rng: np.random.Generator) -> Prompt:
    """The prompt with its box edges and points moved by up to ``jitter`` of each side."""
    s = np.array(shape)
    step = np.maximum(np.round(jitter * s).astype(int), 0)

    def move(a: np.ndarray) -> np.ndarray:
        return a + rng.integers(-step, step + 1, size=a.shape)

    lo = np.clip(move(prompt.lo), 0, s - 1)
    hi = np.clip(move(prompt.hi), lo, s - 1)
    pts = np.clip(move(prompt.points), lo, hi)
    return Prompt(lo, hi, pts)


class Prompter(Protocol):
    """A promptable segmenter: one image (2D, or 3D where ``ndim`` is 3) and one prompt
    -> (mask in the image's geometry, confidence)."""

    ndim: int

    def __call__(self, image: np.ndarray, heat: np.ndarray, prompt: Prompt) -> tuple[np.ndarray, float]: ...


@dataclass(frozen=True)
class RandomWalker:
    """scikit-image's random walker seeded from the prompt (2D and 3D, no weights)."""

    beta: float = RW_BETA
    ndim: int = 3

    def __call__(self, image: np.ndarray, heat: np.ndarray, prompt: Prompt) -> tuple[np.ndarray, float]:
        from skimage.segmentation import random_walker

        box = prompt.box_mask(image.shape)
        labels = np.where(box, 0, 2).astype(np.int32)
        if not (labels == 2).any():  # the box is the whole image: the map's cold voxels are background
            labels[heat < RW_BACKGROUND_FLOOR * heat.max()] = 2
        labels[tuple(prompt.points.T)] = 1
        if not (labels == 2).any() or not (labels == 0).any():
            return labels == 1, 0.0
        lo, hi = float(image.min()), float(image.max())
        data = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image, dtype=np.float64)
        prob = random_walker(data, labels, beta=self.beta, mode="cg_j", tol=1e-4, return_full_prob=True)[0]
        mask = prob >= 0.5
        return mask, float(np.abs(2 * prob[box] - 1).mean())


class SamPrompter:
    """segment-anything's ``SamPredictor`` prompted with the box and points (2D only;
    :func:`prompted_masks` runs a volume slice by slice)."""

    ndim = 2

    def __init__(self, predictor):
        self.predictor = predictor
        self._embedded: bytes | None = None  # the image whose embedding the predictor holds (tries share it)

    def __call__(self, image: np.ndarray, heat: np.ndarray, prompt: Prompt) -> tuple[np.ndarray, float]:
        lo, hi = float(image.min()), float(image.max())
        g = np.zeros(image.shape, dtype=np.uint8) if hi <= lo else np.round(255 * (image - lo) / (hi - lo)).astype(np.uint8)
        key = g.tobytes() + bytes(str(g.shape), "ascii")
        if key != self._embedded:
            self.predictor.set_image(np.repeat(g[:, :, None], 3, axis=2), image_format="RGB")
            self._embedded = key
        # SAM's coordinates are (x, y) = (column, row) of the image as given; it rescales them itself
        masks, scores, _ = self.predictor.predict(
            point_coords=prompt.points[:, ::-1].astype(np.float32), point_labels=np.ones(len(prompt.points), dtype=int),
            box=np.array([prompt.lo[1], prompt.lo[0], prompt.hi[1], prompt.hi[0]], dtype=np.float32),
            multimask_output=False,
        )
        return np.asarray(masks[0], dtype=bool), float(scores[0])


@functools.lru_cache(maxsize=2)
def load_sam(checkpoint: str, model: str = "vit_b") -> SamPrompter:
    """The SAM (or MedSAM) of a checkpoint file, once per process; a TopoCAMError naming
    the setting where the package or the file is missing."""
    try:
        from segment_anything import SamPredictor, sam_model_registry
    except ImportError:
        raise TopoCAMError("--prompter sam needs the segment-anything package: pip install '.[sam]'") from None
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise TopoCAMError(f"sam_checkpoint {checkpoint} is not a file; give the SAM ViT-B or MedSAM weights (.pth)")
    if model not in SAM_MODELS:
        raise TopoCAMError(f"sam_model must be one of {', '.join(SAM_MODELS)}, got {model!r}")
    try:
        sam = sam_model_registry[model](checkpoint=str(path))
    except Exception as exc:  # a wrong or truncated file: say which
        raise TopoCAMError(f"sam_checkpoint {checkpoint}: cannot load it as SAM {model} ({type(exc).__name__}: {exc})") from None
    sam.eval()
    return SamPrompter(SamPredictor(sam))


def _element(ndim: int, radius: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.iterate_structure(ndimage.generate_binary_structure(ndim, 1), radius)


def tidy(mask: np.ndarray, recipe: PromptRecipe) -> np.ndarray:
    """Morphological opening, then closing (padded, so the image border is not eroded)."""
    from scipy import ndimage

    r = max(recipe.open_radius, recipe.close_radius)
    m = np.pad(mask, r)
    if recipe.open_radius:
        m = ndimage.binary_opening(m, _element(mask.ndim, recipe.open_radius))
    if recipe.close_radius:
        m = ndimage.binary_closing(m, _element(mask.ndim, recipe.close_radius))
    return m[tuple(slice(r, r + n) for n in mask.shape)] if r else m


def _best(image: np.ndarray, heat: np.ndarray, prompt: Prompt, recipe: PromptRecipe, prompter: Prompter,
          rng: np.random.Generator) -> np.ndarray:
    best, score = None, -np.inf
    for t in range(recipe.tries):
        p = prompt if t == 0 else perturbed(prompt, image.shape, recipe.jitter, rng)
        mask, conf = prompter(image, heat, p)
        if conf > score:
            best, score = mask, conf
    return best


def prompted_mask(image: np.ndarray, heat: np.ndarray, recipe: PromptRecipe, prompter: Prompter) -> np.ndarray:
    """The prompted ROI of one image (2D or 3D) from its fused map ``heat`` (same shape)."""
    image = np.asarray(image, dtype=np.float64)
    heat = np.asarray(heat, dtype=np.float64)
    if image.shape != heat.shape:
        raise TopoCAMError(f"image {image.shape} and fused map {heat.shape} differ in shape")
    rng = np.random.default_rng(zlib.crc32(np.ascontiguousarray(heat, dtype=np.float32).tobytes()))
    if image.ndim <= prompter.ndim:
        prompt = prompt_from_map(heat, recipe)
        mask = np.zeros(image.shape, dtype=bool) if prompt is None else _best(image, heat, prompt, recipe, prompter, rng)
    else:  # a 2D segmenter on a volume: slice by slice along the first axis, from the volume's map
        peak = float(heat.max())
        mask = np.zeros(image.shape, dtype=bool)
        for z in range(image.shape[0]):
            prompt = prompt_from_map(heat[z], recipe, peak=peak)
            if prompt is not None:
                mask[z] = _best(image[z], heat[z], prompt, recipe, prompter, rng)
    return tidy(mask, recipe)


def prompted_masks(images: np.ndarray, heat: np.ndarray, recipe: PromptRecipe, prompter: Prompter) -> np.ndarray:
    """:func:`prompted_mask` of each image of a batch (n, *spatial), (n, *spatial) bool."""
    images = np.asarray(images)
    if images.shape != heat.shape:
        raise TopoCAMError(f"images {images.shape} and fused maps {heat.shape} differ in shape")
    out = np.zeros(images.shape, dtype=bool)
    for i in range(len(images)):
        out[i] = prompted_mask(images[i], heat[i], recipe, prompter)
    return out
