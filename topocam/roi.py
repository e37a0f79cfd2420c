"""A_{w,tau}: fuse the per-layer CAMs, threshold at tau, mask the input.

M = sum_l w_l H_l, with each H_l upsampled (bilinear / trilinear) to the input
grid and min-max normalised to [0, 1], and w on the simplex; ROI = M >= tau.
Also the ROI-quality measures used against ground-truth lesions (Dice and the
pointing game).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import CAM_LAYERS
from .errors import TopoCAMError


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
    if not (0.0 <= float(tau) <= 1.0):
        raise TopoCAMError(f"tau must lie in [0, 1], got {tau}")
    return float(tau)


def fuse(maps: Mapping[str, np.ndarray], weights: np.ndarray, shape: tuple[int, ...], chunk: int = 256) -> np.ndarray:
    """Fused map M, (n, *shape) float32 in [0, 1]. Layers with weight 0 are
    not even read (their maps may stay on disk)."""
    n = len(maps[CAM_LAYERS[0]])
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    out = np.zeros((n, *shape), dtype=np.float32)
    for layer, w in zip(CAM_LAYERS, weights):
        if w == 0:
            continue
        for i in range(0, n, chunk):
            h = torch.from_numpy(np.array(maps[layer][i : i + chunk], dtype=np.float32)).unsqueeze(1)
            if tuple(h.shape[2:]) != tuple(shape):
                h = F.interpolate(h, size=shape, mode=mode, align_corners=False)
            flat = h.reshape(h.shape[0], -1)
            lo = flat.min(dim=1, keepdim=True).values
            span = flat.max(dim=1, keepdim=True).values - lo
            flat = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat))
            out[i : i + chunk] += float(w) * flat.reshape(h.shape[0], *shape).numpy()
    return out


def roi_masks(fused: np.ndarray, tau: float) -> np.ndarray:
    return fused >= check_tau(tau)


def dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image Dice between boolean masks (1 when both are empty)."""
    p = pred.reshape(len(pred), -1)
    t = truth.reshape(len(truth), -1)
    inter = (p & t).sum(axis=1)
    denom = p.sum(axis=1) + t.sum(axis=1)
    return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)


def pointing_game(fused: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per image: does the map's maximum fall inside the true lesion?"""
    flat = fused.reshape(len(fused), -1)
    idx = flat.argmax(axis=1)
    return truth.reshape(len(truth), -1)[np.arange(len(truth)), idx]


def random_masks_like(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random masks with exactly the same voxel count per image (the chance baseline)."""
    flat = masks.reshape(len(masks), -1)
    out = np.zeros_like(flat)
    for i, k in enumerate(flat.sum(axis=1)):
        out[i, rng.choice(flat.shape[1], size=int(k), replace=False)] = True
    return out.reshape(masks.shape)
