"""The fast trial path gives exactly what the straightforward computation gives.

What a study trial reuses or does differently for speed, each against a plain
reference written out here:

* per-layer upsampling + normalisation (roi.upsample_normalised) and the
  weighted sum (roi.fuse_upsampled): equal, bit for bit, to a per-image
  ``F.interpolate`` + min-max + ``out += float(w) * H`` reference;
* the context's memory-bounded cache of upsampled maps (roi.UpsampledCache,
  ``ctx.trial_cache``): same fused maps, masks, features and metrics as with
  the cache off;
* the MLP fit on one torch thread with foreach Adam: the same parameters, bit
  for bit, as the plain loop (default Adam) on the caller's thread count.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from topocam.core import pipeline
from topocam.core.backbone import CAM_LAYERS
from topocam.core.cache import CamStore
from topocam.core.cam import CamBatch
from topocam.core.classifier import MLPSettings, _mlp, fit_mlp, one_thread
from topocam.core.data import SPLITS, make_synthetic
from topocam.core.errors import TopoCAMError
from topocam.core.roi import UpsampledCache, fuse_upsampled, fusion_weights, roi_masks, upsample_normalised
from topocam.core.roi import segment
from topocam.core.topology import BettiGrid, features_from_filtrations, roi_counts

# ------------------------------------------------------------------ references


def reference_fuse(maps: dict[str, np.ndarray], weights: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One image at a time: interpolate, min-max normalise, weighted sum in
    layer order (the textbook definition of M)."""
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    n = len(maps[CAM_LAYERS[0]])
    out = np.zeros((n, *shape), dtype=np.float32)
    for i in range(n):
        for layer, w in zip(CAM_LAYERS, weights):
            if w == 0:
                continue
            h = torch.from_numpy(np.array(maps[layer][i], dtype=np.float32))[None, None]
            if tuple(h.shape[2:]) != tuple(shape):
                h = F.interpolate(h, size=shape, mode=mode, align_corners=False)
            h = h[0, 0]
            lo, hi = h.min(), h.max()
            h = (h - lo) / (hi - lo) if hi > lo else torch.zeros_like(h)
            out[i] += (float(w) * h).numpy()
    return out


def reference_fit(x_train, y_train, x_val, y_val, n_classes, settings: MLPSettings, seed: int):
    """The MLP fit as first written: default (per-tensor) Adam, caller's threads."""
    mean = x_train.mean(axis=0)
    scale = x_train.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    ztr = torch.from_numpy(((x_train - mean) / scale).astype(np.float32))
    zva = torch.from_numpy(((x_val - mean) / scale).astype(np.float32))
    ytr = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    yva = torch.from_numpy(np.asarray(y_val, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = _mlp(ztr.shape[1], tuple(settings.hidden), n_classes)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    best_loss, best_epoch, best_state, history = float("inf"), 0, None, []
    for epoch in range(1, settings.max_epochs + 1):
        net.train()
        perm = torch.randperm(len(ztr), generator=gen)
        for i in range(0, len(ztr), settings.batch_size):
            idx = perm[i : i + settings.batch_size]
            opt.zero_grad()
            loss_fn(net(ztr[idx]), ytr[idx]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            vloss = float(loss_fn(net(zva), yva))
        history.append(vloss)
        if vloss < best_loss - 1e-6:
            best_loss, best_epoch = vloss, epoch
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        elif epoch - best_epoch >= settings.patience:
            break
    net.load_state_dict(best_state)
    return net, best_epoch, history


# ------------------------------------------------------------------ fixtures

NATIVE = {2: ((10, 10), (5, 5), (3, 3)), 3: ((6, 6, 6), (3, 3, 3), (2, 2, 2))}


def random_maps(rng, n: int, ndim: int, dtype=np.float32) -> dict[str, np.ndarray]:
    maps = {layer: rng.random((n, *s)).astype(dtype) for layer, s in zip(CAM_LAYERS, NATIVE[ndim])}
    maps["layer3"][1] = 0.25  # a constant map: normalised to zeros
    maps["layer4"][2] = 0.0
    return maps


def random_cam_context(folder, size: int, n: tuple[int, int, int], seed: int, bins: int) -> pipeline.Context:
    """A 3D context whose CAM cache holds random maps (no backbone needed)."""
    data = make_synthetic(3, size=size, n=n, seed=seed, clutter=1)
    store = CamStore(folder, "k")
    rng = np.random.default_rng(seed + 5)
    for variant in ("gradcam", "gradcampp"):
        store.save(variant, {
            s: CamBatch(random_maps(rng, len(data.y[s]), 3), np.zeros(len(data.y[s]), np.int64),
                        np.full((len(data.y[s]), 2), 0.5, np.float32))
            for s in SPLITS
        })
    cfg = pipeline.TopoCAMConfig(
        dataset="synthetic3d", size=size, backbone="small", bins=bins, mlp=(16, 8), n_jobs=1, weights=(0.3, 0.3, 0.4), tau=0.5,
    )
    return pipeline.Context(cfg, data, None, None, {}, store, progress=False)


@pytest.fixture(scope="module")
def fake_ctx(tmp_path_factory):
    return random_cam_context(tmp_path_factory.mktemp("cams"), 12, (40, 20, 20), seed=2, bins=10)


# ------------------------------------------------------------------ fusion


@pytest.mark.parametrize("ndim, shape", [(2, (20, 20)), (3, (12, 12, 12))])
@pytest.mark.parametrize("raw", [(0.2, 0.3, 0.5), (1, 0, 0), (0, 0, 1), (0.1, 0.7, 0.2), (1, 1, 1)])
def test_fuse_equals_per_image_reference(ndim, shape, raw):
    rng = np.random.default_rng(ndim)
    w = fusion_weights(raw)
    for dtype in (np.float32, np.float64):
        maps = random_maps(rng, 7, ndim, dtype)
        expect = reference_fuse(maps, w, shape)
        for chunk in (3, 256):  # 3: chunks that do not divide n
            layers = [upsample_normalised(maps[l], shape, chunk=chunk) if x else None for l, x in zip(CAM_LAYERS, w)]
            got = fuse_upsampled(layers, w)
            assert got.dtype == np.float32 and np.array_equal(got, expect)


def test_upsampling_is_independent_of_chunks_and_threads_and_leaves_input_alone():
    rng = np.random.default_rng(3)
    maps = random_maps(rng, 9, 3)
    before = {k: v.copy() for k, v in maps.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # more than one, whatever this machine's default
    try:
        ref = upsample_normalised(maps["layer3"], (12, 12, 12), chunk=256)
        assert np.array_equal(upsample_normalised(maps["layer3"], (12, 12, 12), chunk=2), ref)
        with one_thread():
            assert torch.get_num_threads() == 1
            assert np.array_equal(upsample_normalised(maps["layer3"], (12, 12, 12)), ref)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(upsample_normalised(maps["layer3"], (3, 3, 3)), reference_fuse(
        {"layer2": maps["layer3"], "layer3": maps["layer3"], "layer4": maps["layer3"]}, np.array([1.0, 0, 0]), (3, 3, 3)
    ))  # native size: normalised only
    assert all(np.array_equal(maps[k], before[k]) for k in maps)
    assert np.all(ref[1] == 0) and ref.min() >= 0 and ref.max() <= 1


def test_fuse_with_all_zero_weights_is_refused():
    maps = random_maps(np.random.default_rng(0), 3, 2)
    with pytest.raises(TopoCAMError, match="all zero"):
        fuse_upsampled([upsample_normalised(maps[l], (20, 20)) for l in CAM_LAYERS], np.zeros(3))


# ------------------------------------------------------------------ the context's cache


def test_upsampled_cache_is_a_bounded_lru_of_read_only_arrays():
    a, b, c = (np.full(100, i, np.float32) for i in range(3))  # 400 bytes each
    cache = UpsampledCache(max_bytes=1000)
    assert cache.get("a", lambda: a) is a and not a.flags.writeable
    assert cache.get("b", lambda: b) is b
    assert cache.get("a", lambda: pytest.fail("a is cached")) is a  # a is now the most recent
    cache.get("c", lambda: c)  # 1200 > 1000: evicts the least recent (b)
    assert len(cache) == 2 and cache.nbytes == 800
    assert cache.get("b", lambda: b.copy()) is not b  # recomputed
    assert cache.hits == 1 and cache.misses == 4
    big = np.zeros(1000, np.float32)
    assert cache.get("big", lambda: big) is big and "big" not in cache._items and big.flags.writeable  # never stored
    off = UpsampledCache(max_bytes=0)
    off.get("a", lambda: np.zeros(1, np.float32))
    assert len(off) == 0


def test_roi_for_equals_fusing_the_cams_and_reuses_upsampled_maps(fake_ctx):
    ctx = fake_ctx
    ctx.trial_cache.clear()
    for cam in ("gradcam", "gradcampp"):
        for raw, tau in (((0.3, 0.3, 0.4), 0.5), ((0.0, 1.0, 0.0), 0.7), ((0.5, 0.0, 0.5), 0.2)):
            cfg = dataclasses.replace(ctx.config, cam=cam, weights=raw, tau=tau)
            for split in ("train", "val"):
                w = fusion_weights(raw)
                expect = reference_fuse(ctx.cams(cam, split).maps, w, ctx.data.shape)
                fused, masks = pipeline.roi_for(ctx, cfg, split)
                assert np.array_equal(fused, expect) and np.array_equal(masks, expect >= tau)
                assert fused.flags.writeable  # a fresh array per call, not a view of the cache
    cache = ctx.trial_cache["upsampled"]
    assert len(cache) == 2 * 2 * 3 and cache.misses == 12  # (variant, split, layer), each computed once
    assert cache.hits > 0


def test_features_and_metrics_same_with_and_without_the_cache(fake_ctx):
    ctx = fake_ctx
    cfg = ctx.config
    ctx.trial_cache.clear()
    cold = pipeline.evaluate(ctx, cfg, report_test=True)
    warm = pipeline.evaluate(ctx, cfg, report_test=True)  # served from the cache
    ctx.trial_cache["upsampled"] = UpsampledCache(max_bytes=0)  # cache off
    off = pipeline.evaluate(ctx, cfg, report_test=True)
    ctx.trial_cache.clear()
    # and the straightforward computation, step by step
    masks = {s: reference_fuse(ctx.cams(cfg.cam, s).maps, fusion_weights(cfg.weights), ctx.data.shape) >= cfg.tau for s in SPLITS}
    grid = BettiGrid.fit(segment(ctx.gray("train"), masks["train"], cfg.outside), cfg.bins)
    for s in SPLITS:
        expect = features_from_filtrations(
            segment(ctx.gray(s), masks[s], cfg.outside), roi_counts(masks[s]), grid, backend="fast", n_jobs=1
        )
        for out in (cold, warm, off):
            assert np.array_equal(out.features.x[s], expect)
    assert cold.val == warm.val == off.val and cold.test == warm.test == off.test


def test_roi_masks_threshold_is_unchanged():
    fused = np.array([[0.0, 0.5999999, 0.6, 1.0]], np.float32)
    assert roi_masks(fused, 0.6).tolist() == [[False, False, True, True]]


# ------------------------------------------------------------------ the MLP


def _features(seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 21)).astype(np.float32)
    y = (x[:, 0] - 0.5 * x[:, 3] + 0.3 * rng.normal(size=300) > 0).astype(int)
    return x[:200], y[:200], x[200:], y[200:]


@pytest.mark.parametrize("hidden, batch", [((128, 64), 128), ((32,), 50)])
def test_mlp_fit_is_bitwise_the_plain_loop(hidden, batch):
    xtr, ytr, xva, yva = _features(1)
    s = MLPSettings(hidden=hidden, max_epochs=12, patience=4, batch_size=batch)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        net, best_epoch, history = reference_fit(xtr, ytr, xva, yva, 2, s, seed=3)
        fitted = fit_mlp(xtr, ytr, xva, yva, 2, s, seed=3)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)
    assert fitted.history == history and fitted.best_epoch == best_epoch
    for (k, v), (k2, v2) in zip(net.state_dict().items(), fitted.net.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    again = fit_mlp(xtr, ytr, xva, yva, 2, s, seed=3)
    assert np.array_equal(again.predict_proba(xva), fitted.predict_proba(xva))


def test_one_thread_restores_the_setting_even_on_error():
    """From 3 threads (set here: on a one-core machine the default is already 1 and
    the test would pass with a one_thread() that did nothing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with one_thread():
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_evaluate_times_its_stages(fake_ctx):
    """What benchmarks/betti.py reports per trial: fuse + threshold (roi) and Betti
    features (betti) inside features, then the classifier."""
    import dataclasses

    out = pipeline.evaluate(fake_ctx, fake_ctx.config)
    t = out.timings_s
    assert list(t) == ["cams", "features", "roi", "betti", "classifier"] and min(t.values()) >= 0
    assert t["roi"] + t["betti"] <= t["features"] <= t["roi"] + t["betti"] + 0.05
    timings: dict[str, float] = {}
    pipeline.topocam_features(fake_ctx, fake_ctx.config, timings=timings)
    assert set(timings) == {"roi", "betti"}
    original = pipeline.evaluate(fake_ctx, dataclasses.replace(fake_ctx.config, method="topo_original"))
    assert list(original.timings_s) == ["cams", "features", "classifier"]  # memoised features: no stages
