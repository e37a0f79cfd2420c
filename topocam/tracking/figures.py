"""Figures that explain one evaluated configuration (the paper's Figs. 3-6 and more).

Pure drawing functions take arrays and return a ``matplotlib.figure.Figure``
(no pyplot: no global figure state, Agg only), so they can be tested against
the numbers they were given:

* :func:`betti_curves_figure` - class-wise median Betti curves with a 40 % band
  (30th-70th percentile), one panel per Betti dimension x {ROI, whole image}
  (Figs. 3 and 5);
* :func:`tsne_figure` - t-SNE of the feature vectors, ROI vs whole image,
  coloured by class (Figs. 4 and 6);
* :func:`cam_overlay_figure` - fused CAM heat maps with the ROI contour, a few
  images per class (3D: the middle slices);
* :func:`roc_figure`, :func:`confusion_figure` - the evaluated split's predictions;
* :func:`roi_quality_rows`, :func:`roi_quality_figure` - Dice, IoU and pointing
  game of the ROI against the true lesion per CAM variant and tau (synthetic sets).

:func:`explain` builds all of them for one configuration on a prepared
:class:`~topocam.pipeline.Context` (re-using its cached backbone and CAMs);
:func:`log_figures` logs them to an MLflow run, :func:`save_figures` writes PNGs.

The core pipeline never imports this module. Nothing here chooses anything:
features and the Betti grid come from :mod:`topocam.pipeline` (grid fitted on
train), the t-SNE and Betti-curve figures show the training split, and the test
split is only drawn (ROC, confusion, overlays, ROI quality) when asked for.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg", force=False)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..core.roi import RoiSelector  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from ..core.pipeline import Context, TopoCAMConfig

BAND = (30.0, 70.0)  # percentiles of the band around the median: 40 % of the images
HEAT_CMAP = "jet"
HEAT_ALPHA = 0.45
ROI_COLOUR = "white"
LESION_COLOUR = "lime"  # the true lesion (synthetic sets), dashed
DEFAULT_TAUS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TSNE_MAX_POINTS = 2000  # a larger training split is subsampled (stratified, seeded) for t-SNE
TSNE_EXACT_MAX = 300  # up to this many points: exact gradients, above: Barnes-Hut
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf", "#393b79")


def _wrap(text: str, fig: Figure, fontsize: int) -> str:
    """``text`` wrapped to the figure's width (long titles name the data and the configuration)."""
    import textwrap as tw

    width = max(30, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))  # ~0.6 em per character
    return "\n".join(tw.fill(line, width) for line in text.split("\n"))


def _suptitle(fig: Figure, text: str, fontsize: int = 11) -> None:
    fig.suptitle(_wrap(text, fig, fontsize), fontsize=fontsize)


suptitle = _suptitle  # the title style of every figure here, for the report's figures (topocam.report.figures)


def class_colour(c: int) -> str:
    return _PALETTE[c % len(_PALETTE)]


def _names(class_names: Sequence[str] | None, n_classes: int) -> list[str]:
    names = list(class_names or [])
    return [names[c] if c < len(names) else f"class {c}" for c in range(n_classes)]


def _n_classes(y: np.ndarray, class_names: Sequence[str] | None) -> int:
    return max(int(np.max(y)) + 1 if len(y) else 0, len(class_names or []))


# ------------------------------------------------------------------ Betti curves


def betti_blocks(features: np.ndarray, bins: int) -> np.ndarray:
    """The Betti curves inside phi's feature vectors: (n, d * bins + 1) -> (n, d, bins).

    Layout (``topology.features_from_filtrations``): beta_0's ``bins`` values,
    then beta_1's, ..., each divided by the ROI voxel count; the count last."""
    x = np.asarray(features)
    if x.ndim != 2 or bins < 1 or (x.shape[1] - 1) % bins or x.shape[1] <= 1:
        raise ValueError(f"features of shape {x.shape} are not d * {bins} Betti values + 1 count")
    d = (x.shape[1] - 1) // bins
    return x[:, :-1].reshape(len(x), d, bins)


def betti_curves_figure(
    roi: np.ndarray, whole: np.ndarray, y: np.ndarray, bins: int, *,
    thresholds: tuple[np.ndarray, np.ndarray] | None = None, class_names: Sequence[str] | None = None,
    band: tuple[float, float] = BAND, title: str = "",
) -> Figure:
    """Class-wise median Betti curves with a band between the ``band`` percentiles
    (default 30th-70th: the middle 40 % of each class), ROI features left, whole-image
    features right, one row per Betti dimension.

    ``roi`` and ``whole``: phi's features (n, d * bins + 1) of the same images, ``y``
    their labels; ``thresholds``: the (ROI, whole) Betti grids for the x axis (else
    the bin index). Each panel is titled ``"beta_k, ROI"`` / ``"beta_k, whole image"``;
    per class it draws the median (``gid="median:c"``), the band's edges
    (``gid="p30:c"``, ``"p70:c"``) and the shaded band between them."""
    y = np.asarray(y).reshape(-1)
    blocks = {"ROI": betti_blocks(roi, bins), "whole image": betti_blocks(whole, bins)}
    d = blocks["ROI"].shape[1]
    if blocks["whole image"].shape[1] != d or len(blocks["ROI"]) != len(y) or len(blocks["whole image"]) != len(y):
        raise ValueError("ROI and whole-image features must hold the same images and Betti dimensions as y")
    k = _n_classes(y, class_names)
    names = _names(class_names, k)
    lo, hi = band
    fig = Figure(figsize=(10, 2.9 * d + (0.5 if title else 0.2)), dpi=100, layout="constrained")
    axes = fig.subplots(d, 2, squeeze=False)
    for col, (where, b) in enumerate(blocks.items()):
        grid = np.asarray(thresholds[col]) if thresholds is not None else np.arange(bins)
        for dim in range(d):
            ax = axes[dim, col]
            for c in range(k):
                curves = b[y == c, dim, :]
                if len(curves) == 0:
                    continue
                med, plo, phi = (np.percentile(curves, q, axis=0) for q in (50.0, lo, hi))
                colour = class_colour(c)
                ax.fill_between(grid, plo, phi, color=colour, alpha=0.2, linewidth=0)
                ax.plot(grid, plo, color=colour, linewidth=0.6, alpha=0.7, gid=f"p{lo:g}:{c}")
                ax.plot(grid, phi, color=colour, linewidth=0.6, alpha=0.7, gid=f"p{hi:g}:{c}")
                ax.plot(grid, med, color=colour, linewidth=2.0, gid=f"median:{c}", label=f"{names[c]} (n={len(curves)})")
            ax.set_title(f"β{dim}, {where}", fontsize=10)
            ax.set_ylabel(f"β{dim} / ROI voxels" if col == 0 else f"β{dim} / image voxels")
            ax.set_xlabel("filtration threshold t" if thresholds is not None else "threshold index")
            ax.grid(alpha=0.3)
            if dim == 0 and col == 0:
                ax.legend(fontsize=8, title=f"median, {lo:g}th-{hi:g}th percentile band", title_fontsize=8)
    _suptitle(fig, title or f"Class-wise Betti curves: median and {hi - lo:g} % band", fontsize=11)
    return fig


# --------------------------------------------------------------------------- t-SNE


def tsne_embedding(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of standardised features (fixed ``random_state``; perplexity capped for small n)."""
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    z = StandardScaler().fit_transform(np.asarray(x, dtype=np.float64))
    perplexity = float(min(30.0, max(2.0, (len(z) - 1) / 3.0)))
    method = "exact" if len(z) <= TSNE_EXACT_MAX else "barnes_hut"  # exact is faster for small n (and exact)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed,
                method=method).fit_transform(z)


def _stratified_subset(y: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    if len(y) <= max_points:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(rng.choice(idx, size=max(1, round(max_points * len(idx) / len(y))), replace=False))
    return np.sort(np.concatenate(keep))


def tsne_figure(
    roi: np.ndarray, whole: np.ndarray, y: np.ndarray, *, class_names: Sequence[str] | None = None, seed: int = 0,
    max_points: int = TSNE_MAX_POINTS, title: str = "",
) -> Figure:
    """t-SNE of the ROI features (left) and the whole-image features (right) of the
    same images, one colour per class (``gid="tsne:<panel>:<c>"``, panels ``ROI`` and
    ``whole``). More than ``max_points`` images: a stratified, seeded subsample."""
    y = np.asarray(y).reshape(-1)
    keep = _stratified_subset(y, max_points, seed)
    k = _n_classes(y, class_names)
    names = _names(class_names, k)
    fig = Figure(figsize=(10, 4.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (panel, label, x) in zip(axes, (("ROI", "ROI (TopoCAM)", roi), ("whole", "whole image (Topo-Original)", whole))):
        emb = tsne_embedding(np.asarray(x)[keep], seed)
        for c in range(k):
            sel = y[keep] == c
            if sel.any():
                ax.scatter(emb[sel, 0], emb[sel, 1], s=12, alpha=0.75, color=class_colour(c), label=f"{names[c]} (n={int(sel.sum())})",
                           gid=f"tsne:{panel}:{c}", edgecolors="none")
        ax.set_title(f"t-SNE of Betti features, {label}", fontsize=10)
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=8, loc="best")
    sub = f" (stratified subsample of {len(keep)} of {len(y)})" if len(keep) < len(y) else ""
    _suptitle(fig, (title or "t-SNE of the feature vectors") + sub, fontsize=11)
    return fig


# ------------------------------------------------------------------- CAM overlays


def middle_slices(depth: int, n: int = 3) -> list[int]:
    """``n`` slice indices spread evenly over the middle half of a volume (the middle one
    included for odd ``n``): 28 slices, n = 3 -> 7, 14, 21."""
    if depth <= n:
        return list(range(depth))
    mid = depth // 2
    idx = np.rint(np.linspace(mid - depth / 4, mid + depth / 4, n)).astype(int).clip(0, depth - 1)
    return sorted(dict.fromkeys(int(i) for i in idx))


def _outline(ax, mask: np.ndarray, colour: str, style: str = "solid", k: int = 8) -> None:
    """A mask's outline along pixel edges (the mask upsampled k times, nearest)."""
    if mask.any() and not mask.all():
        up = np.kron(mask.astype(np.float32), np.ones((k, k), dtype=np.float32))
        ax.contour((np.arange(up.shape[1]) + 0.5) / k - 0.5, (np.arange(up.shape[0]) + 0.5) / k - 0.5, up,
                   levels=[0.5], colors=colour, linewidths=1.3, linestyles=style)


def overlay_panel(
    ax, image: np.ndarray, fused: np.ndarray, mask: np.ndarray, lesion: np.ndarray | None = None,
    vrange: tuple[float, float] | None = None,
) -> None:
    """One 2-D panel: the gray image (shown over ``vrange``, default its own range), the
    fused map as a heat map, the ROI outline (and, where known, the true lesion's, dashed)."""
    lo, hi = vrange if vrange is not None else (float(np.min(image)), float(np.max(image)))
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
    ax.imshow(fused, cmap=HEAT_CMAP, vmin=0.0, vmax=1.0, alpha=HEAT_ALPHA, interpolation="bilinear")
    _outline(ax, mask, ROI_COLOUR)
    if lesion is not None:
        _outline(ax, lesion, LESION_COLOUR, "dashed")
    ax.set_xticks([])
    ax.set_yticks([])


def pick_per_class(y: np.ndarray, per_class: int) -> list[int]:
    """The first ``per_class`` images of each class, class by class (deterministic)."""
    y = np.asarray(y).reshape(-1)
    return [int(i) for c in np.unique(y) for i in np.flatnonzero(y == c)[:per_class]]


def cam_overlay_figure(
    images: np.ndarray, fused: np.ndarray, masks: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, *,
    class_names: Sequence[str] | None = None, per_class: int = 3, n_slices: int = 3, lesions: np.ndarray | None = None,
    title: str = "",
) -> Figure:
    """Fused CAM heat maps with the ROI contour for the first ``per_class`` images of
    each true class. 2D: one row per class, one panel per image; 3D (D, H, W): one row
    per image, one panel per middle slice (:func:`middle_slices`). Each image is
    labelled with its index, true and predicted class (2D: the panel title; 3D: the
    row's label, the panels titled with their slice).
    ``lesions`` (the true lesion masks, synthetic sets): drawn as a dashed outline."""
    images, fused, masks = np.asarray(images), np.asarray(fused), np.asarray(masks, dtype=bool)
    if not (images.shape == fused.shape == masks.shape):
        raise ValueError(f"images {images.shape}, fused maps {fused.shape} and masks {masks.shape} differ in shape")
    y_true, y_pred = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    names = _names(class_names, max(_n_classes(y_true, class_names), int(y_pred.max()) + 1 if len(y_pred) else 0))
    chosen = pick_per_class(y_true, per_class)
    if images.ndim == 3:  # 2D images
        classes = sorted({int(y_true[i]) for i in chosen})
        rows, cols = len(classes), max(len([i for i in chosen if y_true[i] == c]) for c in classes)
        fig = Figure(figsize=(2.3 * cols + 0.4, 2.5 * rows + 0.6), dpi=100, layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for r, c in enumerate(classes):
            idx = [i for i in chosen if y_true[i] == c]
            for j, ax in enumerate(axes[r]):
                if j >= len(idx):
                    ax.axis("off")
                    continue
                i = idx[j]
                overlay_panel(ax, images[i], fused[i], masks[i], None if lesions is None else lesions[i])
                ax.set_title(f"#{i} true: {names[y_true[i]]}\npred: {names[y_pred[i]]}", fontsize=8)
    elif images.ndim == 4:  # 3D volumes: a montage of the middle slices
        zs = middle_slices(images.shape[1], n_slices)
        rows, cols = len(chosen), len(zs)
        fig = Figure(figsize=(2.1 * cols + 1.4, 2.2 * rows + 0.9), dpi=100, layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for r, i in enumerate(chosen):
            vrange = (float(images[i].min()), float(images[i].max()))  # one gray scale per volume
            for j, z in enumerate(zs):
                overlay_panel(axes[r, j], images[i, z], fused[i, z], masks[i, z], None if lesions is None else lesions[i, z],
                              vrange)
                axes[r, j].set_title(f"slice {z}", fontsize=8)
            axes[r, 0].set_ylabel(f"#{i}\ntrue: {textwrap(names[y_true[i]], 16)}\npred: {textwrap(names[y_pred[i]], 16)}",
                                  fontsize=7)
    else:
        raise ValueError(f"expected (n, H, W) images or (n, D, H, W) volumes, got {images.shape}")
    _suptitle(fig, title or "Fused CAM (heat map) and ROI (white contour)" + (", true lesion (dashed green)" if lesions is not None else ""),
              fontsize=11)
    return fig


# ----------------------------------------------------------------- ROC, confusion


def roc_figure(
    y_true: np.ndarray, probs: Mapping[str, np.ndarray], task: str, *, class_names: Sequence[str] | None = None,
    title: str = "",
) -> Figure:
    """ROC curves of one or more models on the same images (``probs``: name -> (n, k)
    softmax). Binary: the positive-class score; multi-class: the macro average of
    the one-vs-rest curves. The legend gives each model's AUC as MedMNIST defines it
    (binary AUC, or macro one-vs-rest), computed with scikit-learn; a line's ``gid``
    is ``"roc:<name>"``."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(y_true).reshape(-1)
    fig = Figure(figsize=(5.4, 5.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    for j, (name, p) in enumerate(probs.items()):
        p = np.asarray(p, dtype=np.float64)
        if np.unique(y).size < 2:
            auc, fpr, tpr = float("nan"), np.array([0.0, 1.0]), np.array([0.0, 1.0])
        elif task == "binary-class":
            auc = float(roc_auc_score(y, p[:, 1]))
            fpr, tpr, _ = roc_curve(y, p[:, 1])
        else:
            auc = float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=np.arange(p.shape[1])))
            fpr = np.linspace(0.0, 1.0, 201)
            tprs = []
            for c in range(p.shape[1]):
                if 0 < (y == c).sum() < len(y):
                    f, t, _ = roc_curve(y == c, p[:, c])
                    tprs.append(np.interp(fpr, f, t))
            tpr = np.mean(tprs, axis=0)
        ax.plot(fpr, tpr, linewidth=2.2 if j == 0 else 1.3, color=_PALETTE[j % len(_PALETTE)], gid=f"roc:{name}",
                label=f"{name} (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    kind = "ROC" if task == "binary-class" else "macro-average one-vs-rest ROC"
    ax.set_title(_wrap(title or kind, fig, 10), fontsize=10)
    return fig


def confusion_figure(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, *, class_names: Sequence[str] | None = None, title: str = "",
) -> Figure:
    """Confusion matrix (rows: true class, columns: predicted class) with each cell's count
    written in it (the texts sum to the number of images)."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1), labels=np.arange(n_classes))
    names = _names(class_names, n_classes)
    side = 1.2 + 0.75 * n_classes
    fig = Figure(figsize=(side + 1.6, side + 0.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, int(cm.max())))
    for (r, c), v in np.ndenumerate(cm):
        ax.text(c, r, str(int(v)), ha="center", va="center", fontsize=10,
                color="white" if v > cm.max() / 2 else "black", gid="count")
    ax.set_xticks(range(n_classes), [textwrap(n) for n in names], fontsize=8)
    ax.set_yticks(range(n_classes), [textwrap(n) for n in names], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(_wrap(title or f"Confusion matrix ({int(cm.sum())} images)", fig, 10), fontsize=10)
    return fig


def textwrap(name: str, width: int = 14) -> str:
    import textwrap as tw

    return "\n".join(tw.wrap(name, width)) or name


# ------------------------------------------------------------------- ROI quality


def roi_quality_rows(
    fused: Mapping[str, np.ndarray], truth: np.ndarray, selector: RoiSelector, taus: Sequence[float] = DEFAULT_TAUS,
    seed: int = 0, generated: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """:func:`topocam.core.roi.quality` (Dice, IoU, pointing game, Betti error, chance
    levels) of the threshold ROI per CAM variant (``fused``: variant -> fused maps
    (n, *shape)) and per tau, at the configuration's own ``selector`` (its tau mode too);
    and, where the configuration's generator is not the threshold, one row of its ROI
    (``generated``: its map and masks; ``tau`` None). The pointing game looks at the
    map's maximum only, so it does not depend on tau."""
    from ..core.roi import quality

    truth = np.asarray(truth, dtype=bool)
    threshold = replace(selector, roi="threshold", mask_model=None)

    def row(generator: str, cam: str, tau: float | None, heat: np.ndarray, masks: np.ndarray) -> dict[str, Any]:
        q = quality(heat, masks, truth, seed)
        return {"generator": generator, "cam": cam, "tau": tau, "tau_mode": selector.tau_mode,
                **{k: q[k] for k in ("dice", "iou", "pointing_game", "betti_error", "dice_random_same_size")},
                "pointing_game_chance": q["pointing_game_random"], "roi_fraction": q["roi_fraction"],
                "n_images": int(len(truth))}

    rows = [row("threshold", v, float(tau), m, replace(threshold, tau=float(tau)).masks(m))
            for v, m in fused.items() for tau in taus]
    if generated is not None and selector.roi != "threshold":
        rows.append(row(selector.generator, selector.cam, None, *generated))
    return rows


def rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def roi_quality_figure(rows: Sequence[Mapping[str, Any]], *, tau: float | None = None, title: str = "") -> Figure:
    """Dice, IoU and Betti error against tau per CAM variant of the threshold ROI
    (``gid="dice:<cam>"``, ``"iou:<cam>"``, ``"betti:<cam>"``; the random same-size mask
    dashed, ``"dice_random:<cam>"``), another generator's ROI (``tau`` None) as a
    horizontal line (``gid="dice:<generator>"``, ...), and the pointing-game hit rate per
    map as bars with its chance level; ``tau`` (the configuration's) is marked."""
    thr = [r for r in rows if r["tau"] is not None]
    others = [r for r in rows if r["tau"] is None]
    variants = list(dict.fromkeys(r["cam"] for r in thr))
    fig = Figure(figsize=(16, 4.2), dpi=100, layout="constrained")
    ax_d, ax_i, ax_b, ax_p = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1.2, 1.2, 1.2, 0.8]})
    bars: list[tuple[str, float]] = []
    for j, v in enumerate(variants):
        rs = sorted((r for r in thr if r["cam"] == v), key=lambda r: r["tau"])
        t = [r["tau"] for r in rs]
        colour = _PALETTE[j % len(_PALETTE)]
        ax_d.plot(t, [r["dice"] for r in rs], marker="o", color=colour, label=v, gid=f"dice:{v}")
        ax_d.plot(t, [r["dice_random_same_size"] for r in rs], linestyle="--", color=colour, alpha=0.6, linewidth=1,
                  label=f"{v}: random mask, same size", gid=f"dice_random:{v}")
        ax_i.plot(t, [r["iou"] for r in rs], marker="o", color=colour, label=v, gid=f"iou:{v}")
        ax_b.plot(t, [r["betti_error"] for r in rs], marker="o", color=colour, label=v, gid=f"betti:{v}")
        bars.append((v, rs[0]["pointing_game"]))
    for k, r in enumerate(others):
        g, colour = r["generator"], _PALETTE[(len(variants) + k) % len(_PALETTE)]
        for ax, key, what in ((ax_d, "dice", "dice"), (ax_i, "iou", "iou"), (ax_b, "betti_error", "betti")):
            ax.axhline(r[key], color=colour, linewidth=2, label=f"{g} ({r['cam']})", gid=f"{what}:{g}")
        bars.append((g, r["pointing_game"]))
    for j, (name, pg) in enumerate(bars):
        ax_p.bar(j, pg, color=_PALETTE[j % len(_PALETTE)], gid=f"pointing:{name}")
        ax_p.text(j, pg + 0.02, f"{pg:.2f}", ha="center", fontsize=9)
    relative = any(r.get("tau_mode") == "relative" for r in rows)
    for ax, what in ((ax_d, "Dice"), (ax_i, "IoU"), (ax_b, "Betti error")):
        if tau is not None:
            ax.axvline(tau, color="black", linestyle=":", linewidth=1, label=f"configured τ = {tau:.2f}")
        ax.set_xlabel("τ (ROI = fused map ≥ τ · its maximum, per image)" if relative else "τ (ROI = fused map ≥ τ)")
        ax.set_ylabel(f"mean {what} with the true lesion" if what != "Betti error"
                      else "mean Σ_k |β_k(ROI) − β_k(lesion)|")
        if what != "Betti error":
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(f"{what} of the ROI vs τ", fontsize=10)
        ax.legend(fontsize=7)
    if rows:
        ax_p.axhline(rows[0]["pointing_game_chance"], color="gray", linestyle="--", linewidth=1,
                     label=f"chance ({rows[0]['pointing_game_chance']:.2f})")
    ax_p.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7, rotation=20)
    ax_p.set_ylim(0, 1.1)
    ax_p.set_ylabel("hit rate (map maximum inside the lesion)")
    ax_p.set_title("Pointing game (independent of τ)", fontsize=10)
    ax_p.legend(fontsize=7, loc="upper right")
    n = rows[0]["n_images"] if rows else 0
    _suptitle(fig, title or f"ROI against the true lesion ({n} images)", fontsize=11)
    return fig


# --------------------------------------------------------------------- one config


class FigureSet(dict):
    """``name -> Figure`` (what :func:`explain` drew), plus ``tables`` (name -> rows, e.g.
    ``roi_quality``) and ``metrics``: the re-computed metrics of the fitted MLP per split
    (``"val"``, and ``"test"`` when reported) and the CNN's on the evaluated split
    (``"cnn_test"`` / ``"cnn_val"``), so a caller can check them against what was logged."""

    def __init__(self, figures: Mapping[str, Figure] | None = None):
        super().__init__(figures or {})
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.metrics: dict[str, dict[str, float]] = {}


def explain(
    ctx: "Context", cfg: "TopoCAMConfig", report_test: bool = True, *, per_class: int | None = None,
    taus: Sequence[float] | None = None, variants: Sequence[str] | None = None, seed: int = 0,
) -> FigureSet:
    """Every figure for one configuration ``cfg`` on a prepared context (same data,
    backbone and seed as ``ctx``). Re-computes what it needs through
    :mod:`topocam.pipeline` (the cached CAMs make this cheap): ROI and whole-image
    features (Betti grid fitted on train), the MLP of ``cfg.method`` fitted on train
    exactly as ``pipeline.evaluate`` fits it, and its predictions.

    Figures (keys of the returned dict):

    * ``betti_curves``: class-wise median Betti curves with the 30th-70th percentile
      band, ROI vs whole image, TRAINING split;
    * ``tsne``: t-SNE of the TRAINING features, ROI vs whole image;
    * ``cam_overlays``: fused maps and ROI contours of a few images per class;
    * ``roc`` and ``confusion``: the fitted MLP's predictions (with the CNN and the
      other method's ROC for reference);
    * ``roi_quality``: Dice / IoU / pointing game against the true lesion per CAM
      variant and tau (only for data with lesion masks, the synthetic sets;
      rows also in ``.tables["roi_quality"]``). ``variants`` defaults to every CAM
      variant: one not yet cached costs one CAM pass over the dataset.

    The evaluated split of the last four is test when ``report_test`` (a reported
    configuration: best trial, ablation arm, a ``topocam run`` seed), else
    validation: nothing here is used to choose anything.

    Typical use (e.g. for an ablation arm's best run)::

        ctx = pipeline.prepare(cfg)
        figs = figures.explain(ctx, cfg, report_test=True)
        figures.log_figures(MlflowClient(uri), run_id, figs)   # -> figures/*.png (+ csv tables)
        figures.save_figures(figs, out_dir)                     # PNGs on disk, optional
    """
    from ..core.cam import CAM_VARIANTS
    from ..core.metrics import evaluate as score
    from ..core.metrics import predicted_labels
    from ..core.pipeline import fit_and_score, original_features, roi_for, selector_for, topocam_features

    cfg = cfg.validated()
    data = ctx.data
    split = "test" if report_test else "val"
    names = _names(data.class_names, data.n_classes)
    roi = topocam_features(ctx, cfg, report_test)
    whole = original_features(ctx, cfg, report_test)
    own, other = (roi, whole) if cfg.method == "topocam" else (whole, roi)
    label = {"topocam": "TopoCAM", "topo_original": "Topo-Original"}
    other_method = "topo_original" if cfg.method == "topocam" else "topocam"
    fit = fit_and_score(ctx, cfg, own, report_test)
    other_fit = fit_and_score(ctx, cfg, other, report_test)
    y = data.y[split]
    probs = fit.probs[split]
    pred = predicted_labels(probs, data.task)
    out = FigureSet()
    out.metrics = {s: fit.val if s == "val" else fit.test for s in (("val", "test") if report_test else ("val",))}
    roi_desc = f"{cfg.cam}, w = {tuple(round(float(w), 2) for w in cfg.weights)}, τ = {cfg.tau:.2f}" + (
        " relative to each map's maximum" if cfg.tau_mode == "relative" else "")
    ytr = data.y["train"]
    out["betti_curves"] = betti_curves_figure(
        roi.x["train"], whole.x["train"], ytr, cfg.bins, thresholds=(roi.grid.thresholds, whole.grid.thresholds),
        class_names=names,
        title=f"{data.name}, training split ({len(ytr)} images): class-wise Betti curves, median and "
              f"{BAND[0]:g}th-{BAND[1]:g}th percentile band\nROI: {roi_desc}; outside = {cfg.outside}",
    )
    out["tsne"] = tsne_figure(roi.x["train"], whole.x["train"], ytr, class_names=names, seed=seed,
                              title=f"{data.name}, training split: t-SNE (seed {seed}) of the Betti features")
    fused, masks = roi_for(ctx, cfg, split)  # the configuration's generator: its map and ROI
    k = per_class if per_class is not None else (3 if data.n_classes <= 4 else 1)
    out["cam_overlays"] = cam_overlay_figure(
        ctx.gray(split), fused, masks, y, pred, class_names=names, per_class=k,
        lesions=None if data.lesion_masks is None else data.lesion_masks[split],
        title=f"{data.name}, {split} split: fused CAM ({roi_desc}), ROI (white contour)"
              f"{'' if data.lesion_masks is None else ', true lesion (dashed green)'}; prediction of {label[cfg.method]}",
    )
    roc_probs = {label[cfg.method]: probs, label[other_method]: other_fit.probs[split], "CNN (backbone)": ctx.cnn_probs[split]}
    out["roc"] = roc_figure(y, roc_probs, data.task, class_names=names,
                            title=f"{data.name}, {split} split ({len(y)} images): ROC")
    out["confusion"] = confusion_figure(y, pred, data.n_classes, class_names=names,
                                        title=f"{label[cfg.method]}, {data.name}, {split} split ({len(y)} images)")
    out.metrics["cnn_" + split] = score(y, ctx.cnn_probs[split], data.task)
    if data.lesion_masks is not None:
        taus = tuple(taus) if taus is not None else tuple(sorted({*DEFAULT_TAUS, round(float(cfg.tau), 4)}))
        fused_by = {v: roi_for(ctx, replace(cfg, cam=v, roi="threshold"), split)[0] for v in (variants or CAM_VARIANTS)}
        rows = roi_quality_rows(fused_by, data.lesion_masks[split], selector_for(ctx, cfg), taus, seed, (fused, masks))
        out.tables["roi_quality"] = rows
        out["roi_quality"] = roi_quality_figure(
            rows, tau=cfg.tau,
            title=f"{data.name}, {split} split ({len(y)} images): ROI against the true lesion, "
                  f"w = {tuple(round(float(w), 2) for w in cfg.weights)}",
        )
    return out


def save_figures(figs: Mapping[str, Figure], folder: Path, dpi: int = 110) -> list[Path]:
    """Each figure as ``folder/<name>.png`` (and an :class:`FigureSet`'s tables as CSV)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figs.items():
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    for name, rows in getattr(figs, "tables", {}).items():
        path = folder / f"{name}.csv"
        path.write_text(rows_csv(rows))
        paths.append(path)
    return paths


def log_figures(client, run_id: str, figs: Mapping[str, Figure], artifact_dir: str = "figures") -> list[str]:
    """Log each figure to an MLflow run as ``<artifact_dir>/<name>.png`` with
    ``MlflowClient.log_figure`` (and an :class:`FigureSet`'s tables as CSV beside
    them); works on a finished run. Returns the artifact paths."""
    paths = []
    for name, fig in figs.items():
        path = f"{artifact_dir}/{name}.png"
        client.log_figure(run_id, fig, path)
        paths.append(path)
    for name, rows in getattr(figs, "tables", {}).items():
        path = f"{artifact_dir}/{name}.csv"
        client.log_text(run_id, rows_csv(rows), path)
        paths.append(path)
    return paths
