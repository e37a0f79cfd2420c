"""The fused CAM as a heat map with the ROI contour over the image, as a PNG.

2D: two panels, the image with the ROI contour (outside dimmed), and the
same with the heat map over it. 3D: a montage of up to nine slices along the first axis (D),
evenly spaced, each titled with its index, heat map and contour over the slice.
"""

from __future__ import annotations

import io

import numpy as np

HEAT_CMAP = "jet"
HEAT_ALPHA = 0.45
CONTOUR_COLOUR = "white"
OUTSIDE_DIM = 0.55  # opacity of the black shade outside the ROI (left panel)


def _contour(ax, mask: np.ndarray, k: int = 8) -> None:
    """The ROI's outline along pixel edges (the mask upsampled k times, nearest)."""
    if not mask.any() or mask.all():
        return
    up = np.kron(mask.astype(np.float32), np.ones((k, k), dtype=np.float32))
    ys = (np.arange(up.shape[0]) + 0.5) / k - 0.5
    xs = (np.arange(up.shape[1]) + 0.5) / k - 0.5
    ax.contour(xs, ys, up, levels=[0.5], colors=CONTOUR_COLOUR, linewidths=1.6)


def _panel(ax, image: np.ndarray, fused: np.ndarray | None, mask: np.ndarray) -> None:
    """The image with the heat map over it, or (``fused`` None) with the outside of the ROI dimmed."""
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    if fused is not None:
        ax.imshow(fused, cmap=HEAT_CMAP, vmin=0.0, vmax=1.0, alpha=HEAT_ALPHA, interpolation="bilinear")
    else:
        shade = np.zeros((*mask.shape, 4), dtype=np.float32)
        shade[..., 3] = np.where(mask, 0.0, OUTSIDE_DIM)
        ax.imshow(shade, interpolation="nearest")
    _contour(ax, mask)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def montage_slices(depth: int, n: int = 9) -> list[int]:
    return sorted({int(round(v)) for v in np.linspace(0, depth - 1, min(n, depth))})


def render_png(image: np.ndarray, fused: np.ndarray, mask: np.ndarray, title: str = "", px: int = 360) -> bytes:
    """``image`` (gray, [0, 1]), ``fused`` ([0, 1]) and ``mask`` (bool), all (H, W) or (D, H, W)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global figure state, safe in a server

    dpi = 100
    head = 0.45 if title else 0.0  # inches of title
    if image.ndim == 2:
        w, label = px / dpi, 0.25  # panel side, inches for the panel labels
        fig = Figure(figsize=(2 * w, w + head + label), dpi=dpi)
        total = w + head + label
        for k, (heat, name) in enumerate(((None, "image, outside the ROI dimmed"), (fused, "CAM heat map and ROI"))):
            ax = fig.add_axes((0.01 + 0.5 * k, 0.02 * w / total, 0.48, 0.96 * w / total))
            _panel(ax, image, heat, mask)
            ax.set_title(name, fontsize=9)
    else:
        idx = montage_slices(image.shape[0])
        cols = min(3, len(idx))
        rows = -(-len(idx) // cols)
        fig = Figure(figsize=(max(cols * 1.6, 3.6), rows * 1.75 + head), dpi=dpi)
        axes = fig.subplots(rows, cols, squeeze=False)
        for k, ax in enumerate(axes.flat):
            if k < len(idx):
                z = idx[k]
                _panel(ax, image[z], fused[z], mask[z])
                ax.set_title(f"slice {z}", fontsize=8)
            else:
                ax.axis("off")
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, wspace=0.08, hspace=0.25,
                            top=1 - (head + 0.2) / (rows * 1.75 + head))
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.06 / (fig.get_figheight()), va="top")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
