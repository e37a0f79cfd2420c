"""The on-disk CAM cache (topocam.cache): what is saved is what is loaded, the
key follows what the maps depend on, and a damaged entry is never read as if
it were whole (the pipeline recomputes it)."""

from __future__ import annotations

import os

import re

import numpy as np
import pytest

from topocam.core.backbone import CAM_LAYERS
from topocam.core.cache import CamStore, cam_cache_key
from topocam.core.errors import CorruptCacheWarning
from topocam.core.locks import BadEntry
from topocam.core.cam import CamBatch

SHAPES = {"layer2": (6, 6), "layer3": (3, 3), "layer4": (2, 2)}


def batch(n: int, seed: int) -> CamBatch:
    rng = np.random.default_rng(seed)
    return CamBatch(
        maps={layer: rng.random((n, *SHAPES[layer])).astype(np.float32) for layer in CAM_LAYERS},
        targets=rng.integers(0, 3, n),
        probs=rng.dirichlet(np.ones(3), n).astype(np.float32),
    )


@pytest.fixture
def saved(tmp_path):
    store = CamStore(tmp_path, "k")
    batches = {"train": batch(7, 0), "val": batch(4, 1)}
    store.save("gradcam", batches)
    return store, batches


def assert_same(a: CamBatch, b: CamBatch) -> None:
    assert set(a.maps) == set(b.maps) == set(CAM_LAYERS)
    for layer in CAM_LAYERS:
        np.testing.assert_array_equal(a.maps[layer], b.maps[layer])
        assert a.maps[layer].dtype == np.float32
    np.testing.assert_array_equal(a.targets, b.targets)
    np.testing.assert_array_equal(a.probs, b.probs)


def test_save_load_roundtrip_memory_mapped(saved):
    store, batches = saved
    for split, b in batches.items():
        got = store.load("gradcam", split)
        assert_same(got, b)
        assert all(isinstance(m, np.memmap) for m in got.maps.values())
    assert store.size_bytes() == sum(p.stat().st_size for p in store.root.rglob("*.npy")) > 0


def test_has_only_a_completed_variant(tmp_path):
    store = CamStore(tmp_path, "k")
    assert not store.has("gradcam") and store.size_bytes() == 0
    store.save("gradcam", {"train": batch(3, 0)})
    assert store.has("gradcam") and not store.has("gradcampp")
    assert not any(p.name.startswith(".gradcam.tmp") for p in store.root.iterdir())  # the temporary folder is gone
    (store.root / "gradcampp" / "train").mkdir(parents=True)  # a folder without the completion marker
    assert not store.has("gradcampp")


def test_ensure_reuses_a_complete_entry(saved):
    """A second worker asking for a variant already in the cache reads it, never recomputes it."""
    store, batches = saved
    assert store.ensure("gradcam", lambda: pytest.fail("a complete entry was computed again")) is False
    assert_same(store.load("gradcam", "train"), batches["train"])


def test_key_follows_backbone_data_and_target_rule():
    key = cam_cache_key("bb1", "data1", "predicted")
    assert key == cam_cache_key("bb1", "data1", "predicted") and len(key) == 20
    others = {cam_cache_key("bb2", "data1", "predicted"), cam_cache_key("bb1", "data2", "predicted"),
              cam_cache_key("bb1", "data1", "label")}
    assert key not in others and len(others) == 3
    assert CamStore("/c", key).root != CamStore("/c", cam_cache_key("bb1", "data1", "label")).root


def truncate(path, keep: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(keep)


@pytest.mark.parametrize("name", ["layer2.npy", "layer4.npy", "targets.npy", "probs.npy"])
@pytest.mark.parametrize("cut", ["tail", "header", "empty", "missing"])
def test_a_damaged_file_is_an_error_naming_the_entry(saved, name, cut):
    store, _ = saved
    path = store.root / "gradcam" / "train" / name
    if cut == "missing":
        path.unlink()
    else:
        truncate(path, {"tail": path.stat().st_size - 4, "header": 40, "empty": 0}[cut])
    with pytest.raises(BadEntry, match=re.escape(str(path))):
        store.load("gradcam", "train")
    store.load("gradcam", "val")  # the other split is intact


def test_files_of_different_lengths_are_an_error(saved):
    store, _ = saved
    np.save(store.root / "gradcam" / "train" / "layer3.npy", batch(5, 0).maps["layer3"])  # a whole file, 5 images not 7
    with pytest.raises(BadEntry, match=r"train/layer3.npy holds \(5,\) images, targets.npy 7"):
        store.load("gradcam", "train")


def test_the_pipeline_recomputes_a_damaged_entry(tmp_path):
    """Context.cams discards a damaged entry with a warning and computes the maps again
    (the same maps: they depend on the model and the data only)."""
    from topocam.core import pipeline
    from topocam.core.backbone import BackboneInfo, build_backbone
    from topocam.core.data import make_synthetic

    data = make_synthetic(2, size=16, n=(6, 4, 4), seed=0, clutter=1)
    model, init = build_backbone("small", 2, data.n_classes, 16)
    info = BackboneInfo("small", {}, data.name, init, 0, float("nan"))  # an untrained backbone's: batches at their defaults
    cfg = pipeline.TopoCAMConfig(dataset="synthetic2d", size=16, backbone="small", n_jobs=1)
    ctx = pipeline.Context(cfg, data, model.eval(), info, {}, CamStore(tmp_path, "k"), progress=False)
    first = {layer: np.array(m) for layer, m in ctx.cams("gradcam", "val").maps.items()}
    assert "cams_gradcam" in ctx.timings_s
    layer2 = ctx.store.root / "gradcam" / "val" / "layer2.npy"
    truncate(layer2, layer2.stat().st_size // 2)
    with pytest.raises(BadEntry, match="layer2.npy"):  # damaged under a context that checked it: an error, never used
        ctx.cams("gradcam", "val")
    ctx = pipeline.Context(cfg, data, model.eval(), info, {}, CamStore(tmp_path, "k"), progress=False)
    with pytest.warns(CorruptCacheWarning, match=r"unusable .*layer2.npy.*rebuilding it"):
        again = ctx.cams("gradcam", "val")
    assert "cams_gradcam" in ctx.timings_s  # computed, not read
    for layer in CAM_LAYERS:
        np.testing.assert_allclose(again.maps[layer], first[layer], rtol=1e-5, atol=1e-6)
    assert not any(p.name.endswith(f".tmp{os.getpid()}") for p in ctx.store.root.iterdir())
