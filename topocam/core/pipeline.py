"""TopoCAMConfig -> features -> fitted model -> metrics.

Two levels, following where the time goes (DESIGN.md section 3):

* :func:`prepare` builds a :class:`Context` once per (data, backbone, seed):
  the dataset, the fine-tuned backbone (cached), its predictions and the CAM
  cache. Nothing in it depends on w, tau, the outside mode, bins or the MLP.
* :func:`evaluate` runs one configuration on a context: fuse, threshold, Betti
  curves, MLP. It returns validation metrics, and test metrics only when the
  caller asks for them (reported configurations: never used for a choice).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .backbone import (
    CAM_BATCH, BackboneInfo, cam_batch, cnn_probabilities, default_batch, default_cache_dir, embed, inference_batch,
    resolve_backbone, resolve_device, train_backbone,
)
from .cache import CamStore, cam_cache_key
from .cam import CamBatch, check_variant, compute_cams
from .classifier import Classifier, TopoMLP
from .data import SPLITS, Dataset, images_in, load_dataset
from .errors import DegenerateBackboneWarning, TopoCAMError
from .jobs import resolve_n_jobs
from .memory import chunks, images_per_chunk
from .metrics import evaluate as score
from .metrics import predicted_labels
from .roi import MaskModel, RoiSelector, UpsampledCache, WholeImage, quality, upsample_normalised
from .seeding import reproducibility
from .settings import TopoCAMConfig
from .stats import summarise_method
from .topology import BettiFeatures, BettiGrid, roi_counts


@dataclass
class Context:
    """Everything a trial reuses: built once per (data, backbone, seed)."""

    config: TopoCAMConfig
    data: Dataset
    model: object
    backbone: BackboneInfo
    cnn_probs: dict[str, np.ndarray]
    store: CamStore
    progress: bool = True
    timings_s: dict[str, float] = field(default_factory=dict)
    _gray: dict[str, np.ndarray] = field(default_factory=dict)  # overrides of data.gray (tests only)
    _cams_checked: set[str] = field(default_factory=set)  # variants whose cache entry read back whole
    # per-study memo of trial inputs that do not depend on the trial's
    # configuration; "upsampled": roi.UpsampledCache of per-layer maps (see roi_for)
    trial_cache: dict[str, object] = field(default_factory=dict)

    def health(self) -> BackboneHealth:
        return backbone_health(self.cnn_probs, self.data.task, self.data.n_classes)

    def embedding(self, split: str) -> np.ndarray:
        """The backbone's pooled embedding of a split (the hybrid head's second input)."""
        key = ("embedding", split)
        if key not in self.trial_cache:
            self.trial_cache[key] = embed(self.model, self.data.x[split], batch_size=inference_batch(self.backbone))
        return self.trial_cache[key]

    def gray(self, split: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Single-channel images lo..hi of a split, read when asked (never held whole);
        ``_gray[split]``, where set, replaces a split's images (tests)."""
        if split in self._gray:
            return self._gray[split][lo:hi]
        return self.data.gray(split, lo, hi)

    def cams(self, variant: str, split: str) -> CamBatch:
        """Per-layer maps of one split, computed for all splits on first use (by one of
        the processes sharing the cache; ``timings_s["cams_<variant>"]`` is set where
        they were computed). The entry is checked once per context, not per call."""
        check_variant(variant)
        if variant not in self._cams_checked:
            t0 = time.perf_counter()

            def compute() -> dict[str, CamBatch]:
                return {
                    s: compute_cams(
                        self.model, self.data.x[s], variant, labels=self.data.y[s], rule=self.config.cam_target,
                        batch_size=cam_batch(self.backbone), progress=self.progress, desc=f"{variant} {s}",
                    )
                    for s in SPLITS
                }

            if self.store.ensure(variant, compute):
                self.timings_s[f"cams_{variant}"] = time.perf_counter() - t0
            self._cams_checked.add(variant)
        return self.store.load(variant, split)


def prepare(config: TopoCAMConfig, progress: bool = True, data: Dataset | None = None) -> Context:
    """Load data, fine-tune (or load) the backbone, predict every split."""
    config = config.validated()
    device = resolve_device(config.device)  # a GPU asked for where there is none: said before anything is read
    t0 = time.perf_counter()
    ds = data if data is not None else load_data(config)
    resolve_backbone(config.backbone, ds.ndim)
    check_roi_data(config, ds)
    t_data = time.perf_counter() - t0
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    t0 = time.perf_counter()
    model, info = train_backbone(ds, config.train_settings(), cache_dir=cache_dir, progress=progress,
                                 device=device)
    probs = cnn_probabilities(model, info, ds, cache_dir)
    t_backbone = time.perf_counter() - t0
    store = CamStore(cache_dir, cam_cache_key(info.cache_key, ds.fingerprint, config.cam_target))
    ctx = Context(config, ds, model, info, probs, store, progress, {"data": t_data, "backbone": t_backbone})
    health = ctx.health()
    if health.degenerate:
        warnings.warn(DegenerateBackboneWarning(health.message), stacklevel=2)
    return ctx


def load_data(config: TopoCAMConfig) -> Dataset:
    """The dataset a configuration names (synthetic sets from the DATA seed, not the model seed)."""
    return load_dataset(
        config.dataset, size=config.size, data_dir=config.data_dir, synthetic_n=config.synthetic_n,
        seed=config.data_seed, clutter=config.clutter,
    )


def load_checked(config: TopoCAMConfig) -> Dataset:
    """The configuration checked (:meth:`TopoCAMConfig.validated`), its data read and validated, and
    the backbone checked against the data's dimension: all that can be checked without a store, so
    that the commands do it before they open or create one (bad data then leaves no empty store).
    Hand the dataset to :func:`prepare` / :func:`run` (``data=``): it is read once."""
    config = config.validated()
    resolve_device(config.device)  # here, where a machine's own settings are checked (a study file is read anywhere)
    ds = load_data(config)
    resolve_backbone(config.backbone, ds.ndim)
    check_roi_data(config, ds)
    return ds


def check_roi_data(config: TopoCAMConfig, ds: Dataset) -> None:
    """roi=segmenter trains on lesion masks: data without them is refused before any training."""
    if config.roi == "segmenter" and ds.lesion_masks is None:
        raise TopoCAMError(f"roi=segmenter trains on lesion masks, and {ds.name} has none; use it on synthetic2d / "
                           "synthetic3d (or data with masks), or choose --roi threshold or prompted")


@dataclass(frozen=True)
class BackboneHealth:
    """Predicted-class counts per split: the CAM target is the predicted class, so a
    backbone that predicts one class on validation explains one class only."""

    predicted_counts: dict[str, list[int]]
    degenerate: bool
    message: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def backbone_health(cnn_probs: dict[str, np.ndarray], task: str, n_classes: int) -> BackboneHealth:
    counts = {
        s: np.bincount(predicted_labels(p, task), minlength=n_classes).astype(int).tolist() for s, p in cnn_probs.items()
    }
    val = counts.get("val", [])
    used = [c for c, k in enumerate(val) if k > 0]
    degenerate = len(used) < 2
    message = (
        f"DEGENERATE BACKBONE: it predicts class {used[0] if used else '?'} for all {sum(val)} validation images "
        f"(predicted-class counts per split: {counts}); every predicted-class CAM explains that one class. "
        "Train longer, change lr or batch size, or check the data before trusting these numbers"
    ) if degenerate else None
    return BackboneHealth(counts, degenerate, message)


# ------------------------------------------------------------------ features


@dataclass
class Features:
    x: dict[str, np.ndarray]  # split -> (n, d * bins + 1)
    grid: BettiGrid
    roi_fraction: dict[str, float]  # mean ROI size as a fraction of the image
    empty_rois: dict[str, int]  # images whose ROI is empty (kept, with zero features)


def upsampled(ctx: Context, cam: str, split: str, layer: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """H_l of images lo..hi of a split: ``upsample_normalised`` of layer l's CAMs.

    H_l depends on the CAM variant, not on w or tau: where a split's H_l fits the
    memory-bounded LRU ``ctx.trial_cache["upsampled"]`` it is computed once and
    later trials only sum and threshold; where it does not (64^3 volumes), the
    chunk asked for is computed from the memory-mapped CAMs and not kept (nor is
    the test split's, which no trial reads)."""
    cache = ctx.trial_cache.setdefault("upsampled", UpsampledCache())
    shape = tuple(ctx.data.shape)
    maps = ctx.cams(cam, split).maps[layer]
    # test is read once per reported configuration, never by a trial: caching it only evicts train and val
    if split != "test" and len(maps) * int(np.prod(shape)) * 4 <= cache.max_bytes:
        key = (str(ctx.store.root), cam, split, layer, shape)
        return cache.get(key, lambda: upsample_normalised(maps, shape))[lo:hi]
    return upsample_normalised(maps[lo:hi], shape)


def segmenter_for(ctx: Context, cfg: TopoCAMConfig) -> MaskModel:
    """The segment-then-Betti baseline's network (``roi = segmenter``): trained on the
    training split's lesion masks only (``core.segmenter``, cached on disk like the
    backbone, seeded by the model seed), once per context and loss."""
    check_roi_data(cfg, ctx.data)
    key = ("segmenter", cfg.segmenter_loss, cfg.seed)
    if key not in ctx.trial_cache:
        from .segmenter import SegmenterSettings, train_segmenter

        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        ctx.trial_cache[key] = train_segmenter(ctx.data, SegmenterSettings(loss=cfg.segmenter_loss, seed=cfg.seed),
                                               cache_dir=cache_dir, progress=ctx.progress,
                                               device=resolve_device(ctx.config.device))
    return ctx.trial_cache[key]


def selector_for(ctx: Context, cfg: TopoCAMConfig) -> RoiSelector:
    """The configuration's ROI stage on a context: the one place that decides the ROI
    (training, trials, figures and ROI quality all take it from here)."""
    return RoiSelector.of(cfg, segmenter_for(ctx, cfg) if cfg.roi == "segmenter" else None)


def roi_for(ctx: Context, cfg: TopoCAMConfig, split: str, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The generator's map (the fused M = sum_l w_l H_l; a segmenter's probability) and the
    ROI masks of images lo..hi of a split: :func:`selector_for` on the context's cached maps."""
    hi = len(ctx.data.y[split]) if hi is None else hi
    return _transform(ctx, selector_for(ctx, cfg), cfg.cam, split, lo, hi)


Selector = RoiSelector | WholeImage


def _transform(ctx: Context, selector: RoiSelector, cam: str, split: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    # the prompted ROI segments what phi sees (single-channel); the segmenter takes the images as it was trained on them
    images = None if not selector.needs_images else (
        images_in(ctx.data.x[split], lo, hi) if selector.roi == "segmenter" else ctx.gray(split, lo, hi))
    return selector.transform(lambda layer: upsampled(ctx, cam, split, layer, lo, hi), images)


def masks_of(ctx: Context, selector: Selector, cam: str, split: str, lo: int, hi: int) -> np.ndarray:
    """ROI masks of images lo..hi of a split: the selector on the context's cached CAMs
    (and, for the prompted and segmenter generators, the images)."""
    if isinstance(selector, WholeImage):
        return selector.transform(hi - lo, tuple(ctx.data.shape))[1]
    return _transform(ctx, selector, cam, split, lo, hi)[1]


RoiFn = Callable[[str, int, int], np.ndarray]  # (split, lo, hi) -> ROI masks of images lo..hi


def features_from_masks(
    ctx: Context, selector: Selector, betti: BettiFeatures, roi: RoiFn, splits: tuple[str, ...] = SPLITS,
    progress: bool = False, label: str = "TopoCAM",
) -> Features:
    """phi for the given splits: ``betti`` is fitted on the training split's
    segmented images (its grid), then every split is transformed on that grid.

    A split is worked through a chunk of images at a time (``topocam.core.memory``):
    ROI, segmented float64 filtration and Betti curves of one chunk are all that is
    held, besides the training ROIs (packed bits) kept between the two passes over
    train (the grid needs all of train before any curve). Every feature is the same,
    bit for bit, whatever the chunk. ``progress`` shows a bar per split."""
    from tqdm.auto import tqdm

    shape = tuple(ctx.data.shape)
    per = images_per_chunk(shape)
    n = {s: len(ctx.data.y[s]) for s in dict.fromkeys(("train", *splits))}
    kept: dict[int, np.ndarray] = {}

    def train_filtrations():
        for lo, hi in chunks(n["train"], per):
            m = roi("train", lo, hi)
            kept[lo] = np.packbits(m)
            yield selector.segment(ctx.gray("train", lo, hi), m)

    betti.fit(train_filtrations())

    def masks(s: str, lo: int, hi: int) -> np.ndarray:
        if s == "train" and lo in kept:
            return np.unpackbits(kept.pop(lo), count=(hi - lo) * int(np.prod(shape))).view(bool).reshape(hi - lo, *shape)
        return roi(s, lo, hi)

    x, frac, empty = {}, {}, {}
    for s in splits:
        rows, counts = [], []
        with tqdm(total=n[s], desc=f"{label} Betti curves {s}", unit="img", disable=not progress, leave=False) as bar:
            for lo, hi in chunks(n[s], per):
                m = masks(s, lo, hi)
                c = roi_counts(m)
                rows.append(betti.transform(selector.segment(ctx.gray(s, lo, hi), m), c))
                counts.append(c)
                bar.update(hi - lo)
        c = np.concatenate(counts)
        x[s] = np.concatenate(rows)
        frac[s] = float(c.sum() / (n[s] * int(np.prod(shape))))
        empty[s] = int((c == 0).sum())
    return Features(x, betti.grid_, frac, empty)


def _timed(fn: Callable, spent: list[float]) -> Callable:
    def wrapped(*args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            spent.append(time.perf_counter() - t0)

    return wrapped


def _splits(report_test: bool) -> tuple[str, ...]:
    """A study trial needs train and val only; test is touched only for reported configurations."""
    return SPLITS if report_test else ("train", "val")


def topocam_features(
    ctx: Context, cfg: TopoCAMConfig, report_test: bool = False, progress: bool = False,
    timings: dict[str, float] | None = None,
) -> Features:
    """phi of the CAM-selected ROI; ``timings``, when given, receives the seconds of
    its two stages: ``roi`` (fuse + threshold) and ``betti`` (segment, grid, curves)."""
    splits = _splits(report_test)
    spent: list[float] = []
    t0 = time.perf_counter()
    selector = selector_for(ctx, cfg)
    roi = _timed(lambda s, lo, hi: masks_of(ctx, selector, cfg.cam, s, lo, hi), spent)
    feats = features_from_masks(ctx, selector, _betti(cfg), roi, splits, progress, "TopoCAM")
    if timings is not None:
        timings.update(roi=sum(spent), betti=time.perf_counter() - t0 - sum(spent))
    return feats


def original_features(ctx: Context, cfg: TopoCAMConfig, report_test: bool = False, progress: bool = False) -> Features:
    """Topo-Original: the same phi on the whole image (an all-ones mask)."""
    whole = WholeImage(cfg.outside)
    roi = lambda s, lo, hi: masks_of(ctx, whole, cfg.cam, s, lo, hi)  # noqa: E731
    return features_from_masks(ctx, whole, _betti(cfg), roi, _splits(report_test), progress, "Topo-Original")


def _betti(cfg: TopoCAMConfig) -> BettiFeatures:
    return BettiFeatures.of(cfg, n_jobs=resolve_n_jobs(cfg.n_jobs))


def hybrid_inputs(betti: np.ndarray, embedding: np.ndarray) -> np.ndarray:
    """The hybrid head's input: Betti features, then the backbone's pooled embedding
    (the MLP standardises every column, so the scales need no care here)."""
    return np.concatenate([betti, embedding.astype(np.float32)], axis=1)


def with_embedding(ctx: Context, feats: Features) -> Features:
    return replace(feats, x={s: hybrid_inputs(v, ctx.embedding(s)) for s, v in feats.x.items()})


# ---------------------------------------------------------------- classifier


@dataclass
class FitResult:
    val: dict[str, float]
    test: dict[str, float] | None
    model: TopoMLP
    probs: dict[str, np.ndarray] = field(default_factory=dict)  # split -> (n, k), the splits scored


def fit_and_score(ctx: Context, cfg: TopoCAMConfig, feats: Features, report_test: bool) -> FitResult:
    """Fit g_psi on train (early stopping on an inner split of train); score it on
    val, and on test only if asked."""
    y = ctx.data.y
    mlp = Classifier.of(cfg).fit(feats.x["train"], y["train"], ctx.data.n_classes, feats.x["val"], y["val"])
    probs = {s: mlp.predict_proba(feats.x[s]) for s in (("val", "test") if report_test else ("val",))}
    val = score(y["val"], probs["val"], ctx.data.task)
    test = score(y["test"], probs["test"], ctx.data.task) if report_test else None
    return FitResult(val, test, mlp, probs)


CV_FOLDS = 5


def cv_score(ctx: Context, cfg: TopoCAMConfig, feats: Features, folds: int = CV_FOLDS) -> dict[str, float]:
    """Stratified K-fold estimate on the TRAINING split (``objective = "cv_auc"``): each
    fold's MLP is fitted on the other folds (with its own inner early-stopping split)
    and scored on the held-out fold; the mean over folds. Far less noisy than a small
    validation split, and it keeps validation out of the search altogether. (The Betti
    grid is the one fitted on the whole training split: unsupervised, label-free.)"""
    from sklearn.model_selection import StratifiedKFold

    x, y = feats.x["train"], ctx.data.y["train"]
    if np.bincount(y).min() < folds:
        raise TopoCAMError(f"cv objective: every class needs >= {folds} training images for {folds}-fold cross-validation")
    per_fold = []
    for k, (tr, te) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=cfg.seed % (2**32)).split(x, y)):
        mlp = Classifier(cfg.mlp_settings(), cfg.seed + k).fit(x[tr], y[tr], ctx.data.n_classes)
        per_fold.append(score(y[te], mlp.predict_proba(x[te]), ctx.data.task))
    return {m: float(np.mean([f[m] for f in per_fold])) for m in per_fold[0]}


@dataclass
class TrialOutcome:
    """One configuration evaluated on a context (what a study trial records)."""

    val: dict[str, float]
    test: dict[str, float] | None
    features: Features
    model: TopoMLP
    timings_s: dict[str, float]
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    cv: dict[str, float] | None = None  # K-fold metrics on train, when asked for


def _original_features_memo(ctx: Context, cfg: TopoCAMConfig, report_test: bool, progress: bool = False) -> Features:
    """Topo-Original's features depend on the outside mode, the bins and the backend only,
    not on the MLP a trial tunes: computed once per study context."""
    key = ("original", cfg.outside, cfg.bins, cfg.betti_backend, cfg.betti_grid, report_test)
    if key not in ctx.trial_cache:
        ctx.trial_cache[key] = original_features(ctx, cfg, report_test, progress)
    return ctx.trial_cache[key]


def evaluate(
    ctx: Context, cfg: TopoCAMConfig, report_test: bool = False, progress: bool = False, cv_folds: int = 0,
) -> TrialOutcome:
    """One configuration of ``cfg.method`` (TopoCAM, or Topo-Original on the whole image):
    validation metrics, K-fold training metrics when ``cv_folds``, test metrics only
    when ``report_test``."""
    cfg = cfg.validated()
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    if cfg.method == "topo_original":
        t1 = t0
        feats = _original_features_memo(ctx, cfg, report_test)
    else:
        if cfg.roi != "segmenter":  # the segmenter's ROI reads no CAM
            ctx.cams(cfg.cam, "train")  # builds the cache on first use, timed separately
        t1 = time.perf_counter()
        feats = topocam_features(ctx, cfg, report_test, progress, timings=stages)
    if cfg.head == "hybrid":
        feats = with_embedding(ctx, feats)
    t2 = time.perf_counter()
    fit = fit_and_score(ctx, cfg, feats, report_test)
    cv = cv_score(ctx, cfg, feats, cv_folds) if cv_folds else None
    t3 = time.perf_counter()
    # features = roi (fuse + threshold) + betti (+ the embedding, hybrid head); roi and
    # betti are TopoCAM's only (Topo-Original's features are memoised per context)
    timings = {"cams": t1 - t0, "features": t2 - t1, **stages, "classifier": t3 - t2}
    return TrialOutcome(fit.val, fit.test, feats, fit.model, timings, fit.probs, cv)


@dataclass
class ImagePredictions:
    """The fitted chain applied to new images (see :func:`predict_images`)."""

    probs: np.ndarray  # (n, n_classes) g_psi's softmax
    fused: np.ndarray  # (n, *shape) float32 fused map M in [0, 1]
    masks: np.ndarray  # (n, *shape) bool ROI, M >= tau
    roi_fraction: np.ndarray  # (n,) ROI voxels / image voxels
    cnn_probs: np.ndarray  # (n, n_classes) backbone softmax; its argmax is the CAM target


def check_predictable(cfg: TopoCAMConfig) -> TopoCAMConfig:
    """What a fitted chain can apply to new images on its own (an exported model): not a
    leakage audit; not ``roi = segmenter`` (its network is trained per study context and
    is not part of an exported model); not the ``sam`` prompter (its checkpoint is a file
    of the machine that trained, not in the model). ``roi = prompted`` with the random
    walker predicts exactly as training does. A TopoCAMError otherwise."""
    if cfg.leaks:
        raise TopoCAMError(f"a leakage-audit configuration ({', '.join(cfg.leaks)}) cannot predict new images")
    if cfg.roi == "segmenter":
        raise TopoCAMError("roi=segmenter cannot be exported or predict new images (its segmentation network is not "
                           "part of the model); export a configuration with roi threshold or prompted")
    if cfg.roi == "prompted" and cfg.prompter == "sam":
        raise TopoCAMError("roi=prompted with prompter=sam cannot be exported or predict new images (the SAM checkpoint "
                           "is not part of the model); export one with prompter rw, or roi threshold")
    return cfg


def predict_images(
    model: object, cfg: TopoCAMConfig, grid: BettiGrid, mlp: TopoMLP, x: np.ndarray, n_jobs: int = 1,
) -> ImagePredictions:
    """y = g(phi(A_{w,tau}(f(X)))) for new images ``x`` (n, C, *spatial) float32,
    laid out and scaled like ``Dataset.x``, with a fitted backbone, the
    train-fitted Betti grid and a fitted MLP: the same functions, in the same
    order, as :func:`evaluate` (CAMs of the predicted class, upsampled and
    normalised per layer, fused, thresholded, segmented, Betti curves, MLP), so
    a split's images give that split's probabilities."""
    cfg = check_predictable(cfg.validated())
    x = np.asarray(x, dtype=np.float32)
    shape = tuple(x.shape[2:])
    batch = cfg.infer_batch or default_batch(shape)  # the batches the model was scored in (128 and 64 at 28 px)
    # the CAM target is the predicted class, always
    cams = compute_cams(model, x, cfg.cam, rule="predicted", batch_size=min(CAM_BATCH, batch))
    selector = RoiSelector.of(cfg)
    gray = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1)  # what the topology sees, as Dataset.gray
    fused, masks = selector.from_maps(cams.maps, shape, gray if selector.needs_images else None)
    counts = roi_counts(masks)
    feats = BettiFeatures.fitted(grid, cfg.betti_backend, n_jobs).transform(selector.segment(gray, masks), counts)
    if cfg.head == "hybrid":
        feats = hybrid_inputs(feats, embed(model, x, batch_size=batch))
    frac = counts / float(np.prod(shape))
    return ImagePredictions(mlp.predict_proba(feats), fused, masks, frac, cams.probs)


# --------------------------------------------------------------------- a run


def roi_quality(ctx: Context, cfg: TopoCAMConfig, split: str = "test", seed: int = 0) -> dict[str, float] | None:
    """:func:`topocam.core.roi.quality` of the configuration's ROI against the true lesions
    (data with lesion masks only): Dice, IoU, pointing game, Betti error, chance levels."""
    if ctx.data.lesion_masks is None:
        return None
    heat, masks = roi_for(ctx, cfg, split)
    return quality(heat, masks, ctx.data.lesion_masks[split], seed)


METHODS: tuple[str, ...] = ("topocam", "cnn", "topo_original")
BASELINES: tuple[str, ...] = ("cnn", "topo_original")


@dataclass
class BaselineOutcome:
    """A baseline's metrics and class probabilities on validation and test."""

    val: dict[str, float]
    test: dict[str, float]
    probs: dict[str, np.ndarray]  # "val", "test" -> (n, n_classes)


def baseline(ctx: Context, cfg: TopoCAMConfig, method: str, progress: bool = False) -> BaselineOutcome:
    """What TopoCAM is reported beside, on validation and test: ``"cnn"``, the backbone's own
    softmax; ``"topo_original"``, the same phi on the whole image and g_psi as ``cfg`` sets it
    (the MLP, its seed; the features computed once per context). The one computation behind
    ``topocam run``'s baselines and a study's (logged, replicated, in an ablation's CNN arm)."""
    if method == "cnn":
        probs = {s: ctx.cnn_probs[s] for s in ("val", "test")}
        return BaselineOutcome(score(ctx.data.y["val"], probs["val"], ctx.data.task),
                               score(ctx.data.y["test"], probs["test"], ctx.data.task), probs)
    if method == "topo_original":
        fit = fit_and_score(ctx, cfg, _original_features_memo(ctx, cfg, True, progress), report_test=True)
        return BaselineOutcome(fit.val, fit.test, fit.probs)
    raise TopoCAMError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINES)}")


def run_seed(cfg: TopoCAMConfig, data: Dataset, progress: bool = True) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """One seed of ``topocam run``: TopoCAM, the CNN and Topo-Original (the same
    fixed MLP), validation and test metrics, backbone health, stage timings.
    Returns the result and each method's probabilities per split (for intervals)."""
    ctx = prepare(cfg, progress=progress, data=data)
    cfg = ctx.config
    out = evaluate(ctx, cfg, report_test=True, progress=ctx.progress)
    t0 = time.perf_counter()
    orig = baseline(ctx, cfg, "topo_original", progress=ctx.progress)
    t_orig = time.perf_counter() - t0
    outcomes = {"topocam": out, "cnn": baseline(ctx, cfg, "cnn"), "topo_original": orig}
    probs = {m: o.probs for m, o in outcomes.items()}
    metrics = {m: {"val": o.val, "test": o.test} for m, o in outcomes.items()}
    health = ctx.health()
    result = {
        "seed": cfg.seed,
        "metrics": metrics,
        "backbone": {
            "arch": ctx.backbone.arch, "init": ctx.backbone.init, "best_epoch": ctx.backbone.best_epoch,
            "best_val_auc": ctx.backbone.best_val_auc, "best_val_loss": ctx.backbone.best_val_loss,
            "selected_by": ctx.backbone.selected_by, "cached": ctx.backbone.cached, "cache_key": ctx.backbone.cache_key,
            **health.as_dict(),
        },
        "roi": {
            "fraction": out.features.roi_fraction, "empty": out.features.empty_rois,
            "quality": roi_quality(ctx, cfg),
        },
        "betti_grid": [float(t) for t in out.features.grid.thresholds],
        "n_features": int(out.features.x["train"].shape[1]),
        "timings_s": {
            "data": ctx.timings_s["data"],
            "backbone": ctx.timings_s["backbone"],
            "cams": out.timings_s["cams"],
            "features": out.timings_s["features"],
            "classifier": out.timings_s["classifier"],
            "topo_original": t_orig,
        },
    }
    return result, probs


def summarise_seeds(data: Dataset, runs: Sequence[dict], probs: Sequence[dict[str, dict[str, np.ndarray]]]) -> dict:
    """``summary[method][split][metric] = {"mean", "sd", "n"[, "ci95"]}`` over the seeds' runs,
    plus the ROI quality (synthetic sets) as mean and sd."""
    out: dict = {
        m: {
            s: summarise_method([r["metrics"][m][s] for r in runs], data.y[s], [p[m][s] for p in probs], data.task)
            for s in ("val", "test")
        }
        for m in METHODS
    }
    quality = [r["roi"]["quality"] for r in runs if r["roi"]["quality"]]
    if quality:
        from .stats import mean_sd

        out["roi_quality"] = {k: mean_sd([q[k] for q in quality]) for k in quality[0]}
    out["degenerate_backbones"] = [r["seed"] for r in runs if r["backbone"]["degenerate"]]
    return out


def run(cfg: TopoCAMConfig, seeds: Sequence[int] | None = None, progress: bool = True, data: Dataset | None = None) -> dict:
    """The full ``topocam run``: every seed (backbone and MLP seeds; the data stay
    fixed) and the summary over seeds with bootstrap intervals."""
    cfg = cfg.validated()
    seeds = list(dict.fromkeys(seeds)) if seeds else [cfg.seed]
    if any(s < 0 for s in seeds):
        raise TopoCAMError(f"seeds must be >= 0, got {seeds}")
    ds = data if data is not None else load_data(cfg)
    runs, probs = [], []
    for seed in seeds:
        r, p = run_seed(replace(cfg, seed=seed), ds, progress)
        runs.append(r)
        probs.append(p)
    return {
        "config": {**cfg.as_dict(), "seed": None},
        "seeds": seeds,
        "reproducibility": reproducibility(cfg.device),
        "dataset": {
            "name": ds.name, "source": ds.source, "fingerprint": ds.fingerprint, "task": ds.task, "n_classes": ds.n_classes,
            "shape": list(ds.shape), "n": {s: int(len(ds.y[s])) for s in SPLITS},
        },
        "runs": runs,
        "summary": summarise_seeds(ds, runs, probs),
    }
