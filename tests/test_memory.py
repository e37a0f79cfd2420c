"""Memory bounded by TOPOCAM_CHUNK_VOXELS, not by the data (issue 13), with every
number unchanged: features, grids, CNN probabilities and CAMs are the same bit for
bit whatever the chunk, and a trial's feature stage holds a chunk, not a split.
The peak-memory numbers at 64^3 are measured in benchmarks/memory64.py."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest
import torch

from topocam.core import pipeline
from topocam.core.backbone import CAM_LAYERS, build_backbone, predict_proba
from topocam.core.cache import CamStore
from topocam.core.cam import CamBatch, compute_cams
from topocam.core.data import SPLITS, make_synthetic
from topocam.core.errors import TopoCAMError
from topocam.core.memory import CHUNK_ENV, images_per_chunk
from topocam.core.roi import UpsampledCache, fuse_upsampled, fusion_weights, roi_masks, upsample_normalised
from topocam.core.roi import segment
from topocam.core.topology import BettiGrid, features_from_filtrations, features_per_image_grid, roi_counts

from .test_trial_path import random_cam_context, random_maps

SIZE = 12
VOXELS = SIZE**3


@pytest.fixture(scope="module")
def ctx3d(tmp_path_factory):
    return random_cam_context(tmp_path_factory.mktemp("cams"), SIZE, (41, 13, 11), seed=4, bins=12)


def whole_split_features(ctx, cfg, method: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """phi as the pipeline computed it before chunking: every split's fused maps,
    masks and float64 filtrations whole, the grid from the whole training split."""
    w = fusion_weights(cfg.weights)
    masks = {}
    for s in SPLITS:
        if method == "topo_original":
            masks[s] = np.ones((len(ctx.data.y[s]), *ctx.data.shape), dtype=bool)
        else:
            layers = [upsample_normalised(np.asarray(ctx.cams(cfg.cam, s).maps[l]), ctx.data.shape) for l in CAM_LAYERS]
            masks[s] = roi_masks(fuse_upsampled(layers, w), cfg.tau, cfg.tau_mode)
    gray = {s: ctx.data.gray(s) for s in SPLITS}
    filt = {s: segment(gray[s], masks[s], cfg.outside) for s in SPLITS}
    grid = BettiGrid.fit(filt["train"], cfg.bins)
    if cfg.betti_grid == "per_image":
        x = {s: features_per_image_grid(filt[s], roi_counts(masks[s]), cfg.bins, "fast", 1) for s in SPLITS}
    else:
        x = {s: features_from_filtrations(filt[s], roi_counts(masks[s]), grid, "fast", 1) for s in SPLITS}
    return x, grid.thresholds


@pytest.mark.parametrize("changes", [
    {}, {"outside": "exclude"}, {"tau_mode": "relative", "tau": 0.8}, {"tau": 1.0},  # tau 1: (near-)empty ROIs
    {"betti_grid": "per_image"}, {"cam": "gradcampp", "weights": (0.0, 1.0, 0.0)},
])
@pytest.mark.parametrize("method", ["topocam", "topo_original"])
def test_features_are_the_same_bits_whatever_the_chunk(ctx3d, monkeypatch, changes, method):
    cfg = dataclasses.replace(ctx3d.config, method=method, **changes)
    expect, thresholds = whole_split_features(ctx3d, cfg, method)
    compute = pipeline.topocam_features if method == "topocam" else pipeline.original_features
    # 1 image, 7 (divides no split) and all of them per chunk; the upsampled-map cache off and on
    for per, cache_mb in ((1, 0), (7, 0), (7, 1024), (1000, 1024)):
        monkeypatch.setenv(CHUNK_ENV, str(per * VOXELS))
        ctx3d.trial_cache.clear()
        ctx3d.trial_cache["upsampled"] = UpsampledCache(max_bytes=cache_mb * 2**20)
        feats = compute(ctx3d, cfg, report_test=True)
        cached = {key[2] for key in ctx3d.trial_cache["upsampled"]._items}  # (store, cam, split, layer, shape)
        assert cached == (set() if cache_mb == 0 or method == "topo_original" else {"train", "val"}), cached  # never test
        assert feats.grid.thresholds.tobytes() == thresholds.tobytes(), (per, cache_mb)
        for s in SPLITS:
            assert feats.x[s].dtype == np.float32 and feats.x[s].tobytes() == expect[s].tobytes(), (per, cache_mb, s)
            counts = expect[s][:, -1].astype(np.int64)  # ROI voxel counts (float32 in the features)
            assert feats.roi_fraction[s] == float(counts.sum() / (len(counts) * VOXELS))
            assert feats.empty_rois[s] == int((counts == 0).sum())


def test_a_trial_holds_a_chunk_not_a_split(ctx3d, monkeypatch):
    """Python-side peak allocation (tracemalloc sees every numpy array) of a trial's
    features with the cache off: a few chunks' worth, far below one split's float64
    filtration, which the pipeline held for every split before (with its fused maps)."""
    data = make_synthetic(3, size=16, n=(120, 12, 12), seed=5, clutter=1)
    ctx = dataclasses.replace(ctx3d, data=data, trial_cache={"upsampled": UpsampledCache(max_bytes=0)}, _cams_checked=set())
    rng = np.random.default_rng(3)
    ctx.store = CamStore(ctx3d.store.root.parent.parent / "big", "k")
    ctx.store.save("gradcam", {
        s: CamBatch(random_maps(rng, len(data.y[s]), 3), np.zeros(len(data.y[s]), np.int64), np.full((len(data.y[s]), 2), 0.5, np.float32))
        for s in SPLITS
    })
    cfg = dataclasses.replace(ctx3d.config, size=16)
    train_filtration = 120 * 16**3 * 8  # bytes of the training split's float64 filtration

    def peak(per: int) -> int:
        monkeypatch.setenv(CHUNK_ENV, str(per * 16**3))
        pipeline.topocam_features(ctx, cfg)  # warm: the CAM entry's check, numba's compilation
        tracemalloc.start()
        try:
            pipeline.topocam_features(ctx, cfg)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, whole = peak(4), peak(1000)
    assert small < 0.25 * train_filtration, (small, train_filtration)
    assert whole > 1.5 * train_filtration, whole  # the same code, a split per chunk: what it held before
    assert small < 0.15 * whole, (small, whole)


def test_chunk_setting_is_checked_early_with_its_name(monkeypatch, ctx3d):
    for bad in ("0", "-5", "lots", "1.5"):
        monkeypatch.setenv(CHUNK_ENV, bad)
        with pytest.raises(TopoCAMError, match=CHUNK_ENV):
            ctx3d.config.validated()
    monkeypatch.setenv(CHUNK_ENV, str(10 * VOXELS))
    assert images_per_chunk((SIZE,) * 3) == 10 and images_per_chunk((SIZE,) * 3, cap=4) == 4
    monkeypatch.setenv(CHUNK_ENV, "1")
    assert images_per_chunk((64, 64, 64)) == 1  # never zero images
    monkeypatch.delenv(CHUNK_ENV)
    assert images_per_chunk((64, 64, 64), cap=128) == 16 and images_per_chunk((28, 28, 28), cap=128) == 128


@pytest.mark.parametrize("variant", ["gradcam", "gradcampp"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_cams_record_no_graph_before_the_first_cam_layer_and_keep_their_bits(monkeypatch, ndim, variant):
    """Grad-CAM needs gradients with respect to the CAM layers' outputs only: the
    stem and layer1 (full resolution) are run without autograd. The maps equal, bit
    for bit, those of the full graph with every weight requiring grad (the old path),
    and the tensors autograd saves shrink to those of layer3 and layer4."""
    from topocam.core import cam as cam_mod

    torch.manual_seed(ndim)
    model, _ = build_backbone("small", ndim, 2, 16)
    x = np.random.default_rng(ndim).random((9, 1, *(16,) * ndim), dtype=np.float32)
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(x))  # running statistics away from (0, 1)
    model.eval()

    weights = {p.data_ptr() for p in model.parameters()}

    def saved_bytes_and_maps() -> tuple[int, CamBatch]:
        saved = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.data_ptr() not in weights:  # activations, not the (shared) weights
                saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            maps = compute_cams(model, x, variant)
        return sum(saved), maps

    new_bytes, new = saved_bytes_and_maps()
    assert all(p.requires_grad for p in model.parameters())  # restored
    real_init = cam_mod._Activations.__init__
    with monkeypatch.context() as mp:
        mp.setattr(cam_mod, "_frozen", lambda model: __import__("contextlib").nullcontext())
        mp.setattr(cam_mod._Activations, "__init__", lambda self, model, graph_from_first=False: real_init(self, model, False))
        old_bytes, old = saved_bytes_and_maps()
    for layer in CAM_LAYERS:
        assert new.maps[layer].tobytes() == old.maps[layer].tobytes(), layer
    assert np.array_equal(new.targets, old.targets) and new.probs.tobytes() == old.probs.tobytes()
    assert new_bytes < 0.3 * old_bytes, (new_bytes, old_bytes)


def test_cnn_probabilities_are_cached_with_the_checkpoint(tmp_path, monkeypatch):
    """A second context on a warm cache reads the CNN's probabilities instead of running
    the backbone (a 128-volume batch of 64^3 held over 4 GB); a damaged entry is named
    and recomputed; the values are predict_proba's, bit for bit."""
    from topocam.core import backbone as bb
    from topocam.core.errors import CorruptCacheWarning

    data = make_synthetic(2, size=16, n=(12, 6, 6), seed=0)
    model, info = bb.train_backbone(data, bb.TrainSettings(arch="small", epochs=1, batch_size=4), cache_dir=tmp_path, progress=False)
    first = bb.cnn_probabilities(model, info, data, tmp_path)
    for s in SPLITS:
        assert first[s].tobytes() == predict_proba(model, data.x[s]).tobytes()
    monkeypatch.setattr(bb, "predict_proba", lambda *a, **k: pytest.fail("the backbone ran on a warm cache"))
    again = bb.cnn_probabilities(model, info, data, tmp_path)
    assert all(again[s].tobytes() == first[s].tobytes() for s in SPLITS)
    entry = tmp_path / "backbones" / f"{info.cache_key}.probs.npz"
    entry.write_bytes(entry.read_bytes()[:100])  # truncated, as a kill -9 or a full disk can leave it
    monkeypatch.undo()
    with pytest.warns(CorruptCacheWarning, match=str(entry.name)):
        rebuilt = bb.cnn_probabilities(model, info, data, tmp_path)
    assert all(rebuilt[s].tobytes() == first[s].tobytes() for s in SPLITS)
