"""The backbone's inference and BatchNorm-recalibration batches (settings ``infer_batch``,
``bn_batch``): derived from TOPOCAM_CHUNK_VOXELS by default, in the cache key only where
they differ from the 128 every checkpoint before them was made with, so no 28-px
backbone is retrained and no 28-px number moves."""

from __future__ import annotations

import numpy as np
import pytest

from topocam.core import backbone as bb
from topocam.core.data import make_synthetic
from topocam.core.memory import CHUNK_ENV
from topocam.core.settings import TopoCAMConfig

from .conftest import medmnist_file

# Backbone cache keys of the shipped 28-px studies' configurations (model seeds 0..4), computed
# once with main's code at 8d34b5c, before these settings existed:
#     spec = load_study(f, data_dir=...); ds = load_data(cfg with seed); backbone_key(ds, cfg.train_settings(), arch)
# A change here means every cached backbone (and CAM cache) of these studies is retrained.
MAIN_KEYS = {
    "quickstart": ["cd87a01aab99477a52ec", "c764928b71b0d60da69c", "41edb6e06fd4f8783ad8", "95728c8b12137aedf201",
                   "243721274f7ea2b38fee"],
    "breastmnist": ["259c4577086aa576cba9", "ab489e14308541ef5589", "7cd16bd81a2104a656c3", "dea50aefab5927acc844",
                    "684c1811ae403fd3bf64"],
    "adrenalmnist3d": ["18d2c077983a14d64e18", "e404b2972708523d5c07", "fd8b0ba52868b731f75b", "83e29df8d542d3015ee3",
                       "775e2886c4d9f850b1eb"],
}
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(MAIN_KEYS))
def test_28px_backbone_keys_are_mains(name, monkeypatch):
    from topocam.core.pipeline import load_data
    from topocam.search.studyfile import load_study

    monkeypatch.delenv(CHUNK_ENV, raising=False)
    data_dir = None if name == "quickstart" else str(medmnist_file(f"{name}.npz").parent)
    spec = load_study(REPO / "studies" / f"{name}.toml", data_dir=data_dir)
    ds = load_data(spec.base)
    for seed, want in enumerate(MAIN_KEYS[name]):
        s = TopoCAMConfig(**{**spec.base.as_dict(), "seed": seed}).train_settings()
        resolved = bb.resolve_batches(s, ds.shape)
        # the batches the 28-px numbers were made with: inference and recalibration 128, CAMs 64
        assert (resolved.infer_batch, resolved.bn_batch) == (128, 128)
        assert bb.backbone_key(ds, s, bb.resolve_backbone(s.arch, ds.ndim)) == want, (name, seed)
        # setting 128 explicitly is the same backbone
        explicit = TopoCAMConfig(**{**spec.base.as_dict(), "seed": seed, "infer_batch": 128, "bn_batch": 128})
        assert bb.backbone_key(ds, explicit.train_settings(), bb.resolve_backbone(s.arch, ds.ndim)) == want


@pytest.mark.parametrize("shape, chunk, want", [
    ((28, 28), None, 128), ((28, 28, 28), None, 128), ((64, 64), None, 128),
    ((64, 64, 64), None, 16), ((64, 64, 64), 2 * 2**20, 8), ((64, 64, 64), 1, 1),
])
def test_default_batches_derive_from_the_chunk(shape, chunk, want, monkeypatch):
    if chunk is None:
        monkeypatch.delenv(CHUNK_ENV, raising=False)
    else:
        monkeypatch.setenv(CHUNK_ENV, str(chunk))
    r = bb.resolve_batches(bb.TrainSettings(), shape)
    assert (r.infer_batch, r.bn_batch) == (want, want)
    given = bb.resolve_batches(bb.TrainSettings(infer_batch=5, bn_batch=7), shape)
    assert (given.infer_batch, given.bn_batch) == (5, 7)  # a set value wins over the derived one


def test_batches_other_than_128_enter_the_key_and_reach_training(tmp_path, monkeypatch):
    """A backbone trained at another batch is another backbone (on a CPU the outputs can
    differ in the last bit); the recipe records the batches; recalibration, inference and
    the CAMs run in them."""
    monkeypatch.delenv(CHUNK_ENV, raising=False)
    data = make_synthetic(3, size=16, n=(10, 6, 6), seed=0)
    base = bb.TrainSettings(arch="small", epochs=1, batch_size=4)
    keys = {bb.backbone_key(data, bb.TrainSettings(arch="small", epochs=1, batch_size=4, infer_batch=i, bn_batch=b), "small")
            for i, b in ((None, None), (128, 128), (4, 128), (128, 4), (4, 4))}
    assert len(keys) == 4  # None and 128 are one backbone at 16^3 (128 fit the default chunk)

    seen: dict[str, list[int]] = {"bn": [], "infer": []}
    real_bn, real_pp = bb.recalibrate_batchnorm, bb.predict_proba

    def bn(model, x, batch_size=128, device=None):
        seen["bn"].append(batch_size)
        return real_bn(model, x, batch_size=batch_size, device=device)

    def pp(model, x, batch_size=128, device=None):
        seen["infer"].append(batch_size)
        return real_pp(model, x, batch_size=batch_size, device=device)

    monkeypatch.setattr(bb, "recalibrate_batchnorm", bn)
    monkeypatch.setattr(bb, "predict_proba", pp)
    monkeypatch.setenv(CHUNK_ENV, str(3 * 16**3))  # 3 volumes of 16^3 per chunk
    model, info = bb.train_backbone(data, base, cache_dir=tmp_path, progress=False)
    assert (info.settings["infer_batch"], info.settings["bn_batch"]) == (3, 3)
    assert seen == {"bn": [3], "infer": [3]}
    probs = bb.cnn_probabilities(model, info, data, tmp_path)
    assert seen["infer"] == [3, 3, 3, 3] and bb.cam_batch(info) == 3
    assert np.isfinite(probs["test"]).all()


def test_batches_are_settings_of_the_recipe():
    """Declared once: a study file's [backbone] and ``topocam run`` take them; the preset leaves them derived."""
    from topocam.core.settings import SETTINGS, recipe_settings

    assert {"infer_batch", "bn_batch"} <= set(recipe_settings())
    assert bb.training_recipe("medmnist_v2")["infer_batch"] is None
    cfg = TopoCAMConfig(infer_batch=8, bn_batch=4).validated()
    assert (cfg.train_settings().infer_batch, cfg.train_settings().bn_batch) == (8, 4)
    with pytest.raises(Exception, match="bn_batch"):
        SETTINGS["bn_batch"].check(1)


@pytest.mark.parametrize("n, micro, sizes", [
    (32, 32, [32]), (32, 16, [16, 16]), (32, 8, [8, 8, 8, 8]), (33, 16, [11, 11, 11]), (3, 2, [3]), (5, 2, [3, 2]),
])
def test_micro_batches_cover_the_batch_in_parts_of_two_or_more(n, micro, sizes):
    import torch

    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    parts = bb.micro_batches(idx, micro)
    assert [len(p) for p in parts] == sizes
    assert torch.equal(torch.cat(parts), idx)  # every row once, in the permutation's order


def test_accumulated_micro_batches_give_the_whole_batchs_gradient():
    """Without BatchNorm, a batch trained in parts of 3 has the gradient (and summed loss) of the
    batch in one part: each part's loss is weighted by its share."""
    import torch

    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(10, 1, 4, 4)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 10)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    idx = torch.arange(10)
    grads, totals = [], []
    for micro in (10, 3):
        model.zero_grad()
        totals.append(bb.batch_gradients(model, torch.nn.CrossEntropyLoss(), x, y, idx, micro, torch.device("cpu")))
        grads.append([p.grad.clone() for p in model.parameters()])
    assert totals[0] == pytest.approx(totals[1], rel=1e-6)
    for whole, parts in zip(*grads):
        torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape, chunk, batch, want", [
    ((28, 28), None, 32, 32), ((28, 28, 28), None, 32, 32), ((28, 28, 28), None, 128, 128), ((64, 64), None, 128, 128),
    ((64, 64, 64), None, 32, 16), ((64, 64, 64), 2 * 2**20, 32, 8), ((64, 64, 64), 1, 32, 2),
])
def test_training_micro_batch_derives_from_the_chunk(shape, chunk, batch, want, monkeypatch):
    if chunk is None:
        monkeypatch.delenv(CHUNK_ENV, raising=False)
    else:
        monkeypatch.setenv(CHUNK_ENV, str(chunk))
    assert bb.resolve_batches(bb.TrainSettings(batch_size=batch), shape).micro_batch == want
    assert bb.resolve_batches(bb.TrainSettings(batch_size=batch, micro_batch=4), shape).micro_batch == 4  # set wins
    assert bb.resolve_batches(bb.TrainSettings(batch_size=batch, micro_batch=999), shape).micro_batch == batch  # at most the batch


def test_micro_batches_enter_the_key_only_when_they_split_the_batch_and_reach_training(tmp_path, monkeypatch):
    import torch

    monkeypatch.delenv(CHUNK_ENV, raising=False)
    data = make_synthetic(3, size=16, n=(12, 6, 6), seed=0)
    key = {m: bb.backbone_key(data, bb.TrainSettings(arch="small", epochs=1, batch_size=6, micro_batch=m), "small")
           for m in (None, 6, 64, 3, 2)}
    assert key[None] == key[6] == key[64]  # the whole batch: the backbone it always was
    assert len({key[None], key[3], key[2]}) == 3

    sizes: list[int] = []
    real_fwd = bb.Backbone.forward

    def spy(self, x):
        if self.training and torch.is_grad_enabled():
            sizes.append(len(x))
        return real_fwd(self, x)

    monkeypatch.setattr(bb.Backbone, "forward", spy)
    monkeypatch.setenv(CHUNK_ENV, str(3 * 16**3))  # 3 volumes per chunk: parts of 3
    _, info = bb.train_backbone(data, bb.TrainSettings(arch="small", epochs=1, batch_size=6), cache_dir=tmp_path, progress=False)
    assert info.settings["micro_batch"] == 3 and sizes == [3, 3, 3, 3]
    # the derived micro-batch is the backbone an explicit one of 3 is (with the chunk's batches of 3 too)
    explicit = bb.TrainSettings(arch="small", epochs=1, batch_size=6, micro_batch=3, infer_batch=3, bn_batch=3)
    assert info.cache_key == bb.backbone_key(data, explicit, "small") != key[None]
