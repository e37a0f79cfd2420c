"""f_theta: BatchNorm recalibration, checkpoint selection, health (small real models)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from topocam.core import backbone as bb
from topocam.core.backbone import (
    SELECT_LOSS, TrainSettings, predict_proba, recalibrate_batchnorm, selection_key, train_backbone,
)
from topocam.core.data import make_synthetic
from topocam.core.metrics import evaluate, predicted_labels
from topocam.core.pipeline import backbone_health

QUICKSTART = TrainSettings(arch="small", epochs=2, batch_size=16, lr=1e-3, seed=0)


@pytest.fixture(scope="module")
def quickstart_data():
    return make_synthetic(2, size=24, n=(120, 40, 40), seed=0)


def test_quickstart_collapse_reproduced_without_recalibration_and_fixed_by_it(quickstart_data, tmp_path, monkeypatch):
    """The README's main job: 2 epochs, batch 16. Without recalibration (the old code) the
    eval-mode network predicts one class for every validation image although its AUC is
    high; recalibrating the same weights' BatchNorm statistics on train fixes it."""
    ds = quickstart_data
    monkeypatch.setattr(bb, "recalibrate_batchnorm", lambda *a, **k: 0)
    stale, _ = train_backbone(ds, QUICKSTART, cache_dir=tmp_path / "old", progress=False)
    before = predict_proba(stale, ds.x["val"])
    assert np.unique(predicted_labels(before, ds.task)).size == 1, "precondition: the old recipe collapses"
    monkeypatch.undo()
    assert recalibrate_batchnorm(stale, ds.x["train"]) > 0
    after = predict_proba(stale, ds.x["val"])
    assert np.unique(predicted_labels(after, ds.task)).size == 2
    assert evaluate(ds.y["val"], after, ds.task)["acc"] >= 0.75


def test_trained_backbone_is_healthy_on_the_quickstart_recipe(quickstart_data, tmp_path):
    ds = quickstart_data
    model, info = train_backbone(ds, QUICKSTART, cache_dir=tmp_path, progress=False)
    probs = {s: predict_proba(model, ds.x[s]) for s in ("train", "val", "test")}
    health = backbone_health(probs, ds.task, ds.n_classes)
    assert not health.degenerate and min(health.predicted_counts["val"]) > 5
    assert evaluate(ds.y["val"], probs["val"], ds.task)["acc"] >= 0.75
    assert all("val_loss" in h for h in info.history)
    best = max(info.history, key=lambda h: selection_key(h["val_auc"], h["val_loss"]))
    assert info.best_epoch == best["epoch"]


def test_recalibrated_statistics_are_the_training_population_statistics():
    torch.manual_seed(0)
    model = bb.SmallCNN(2, 2, width=4)
    first_bn = model.layer1.body[1]
    for n, tol in ((36, 1e-5), (37, 1e-3)):  # 37: the last batch of one is folded into the previous (unequal weights)
        x = np.random.default_rng(n).random((n, 3, 12, 12), dtype=np.float32)
        first_bn.running_mean.fill_(5.0)
        recalibrate_batchnorm(model, x, batch_size=12)
        with torch.no_grad():
            conv_out = model.layer1.body[0](torch.from_numpy(x))
        torch.testing.assert_close(first_bn.running_mean, conv_out.mean(dim=(0, 2, 3)), rtol=tol, atol=tol)
    assert first_bn.momentum == 0.1 and model.training  # settings restored


def test_selection_key_breaks_auc_ties_by_loss_and_falls_back_to_loss():
    assert selection_key(0.9, 0.3) > selection_key(0.9, 0.5)
    assert selection_key(0.91, 0.9) > selection_key(0.9, 0.1)
    assert selection_key(float("nan"), 0.2) > selection_key(float("nan"), 0.4)


def test_one_class_validation_is_a_defined_selection_not_a_crash(tmp_path):
    """It used to raise a raw TypeError: no epoch ever beat an AUC of NaN."""
    ds = make_synthetic(2, size=16, n=(24, 6, 6), seed=0, clutter=1)
    ds = replace(ds, y={**ds.y, "val": np.zeros_like(ds.y["val"])}, fingerprint=ds.fingerprint + "-oneclass")
    _, info = train_backbone(ds, replace(QUICKSTART, epochs=3), cache_dir=tmp_path, progress=False)
    assert info.selected_by == SELECT_LOSS and math.isnan(info.best_val_auc)
    assert info.best_epoch == min(info.history, key=lambda h: h["val_loss"])["epoch"]


def test_health_flags_a_single_predicted_class():
    one = {"val": np.tile([0.3, 0.7], (10, 1)), "test": np.tile([0.8, 0.2], (4, 1))}
    h = backbone_health(one, "binary-class", 2)
    assert h.degenerate and h.predicted_counts == {"val": [0, 10], "test": [4, 0]}
    assert "predicts class 1 for all 10 validation images" in h.message
    ok = backbone_health({"val": np.array([[0.3, 0.7], [0.6, 0.4]])}, "binary-class", 2)
    assert not ok.degenerate and ok.message is None


def test_medmnist_v2_preset_and_milestones(tmp_path):
    from topocam.core.backbone import training_recipe

    r = training_recipe("medmnist_v2")
    assert (r["epochs"], r["batch_size"], r["lr"], r["milestones"]) == (100, 128, 1e-3, (50, 75))
    assert training_recipe("medmnist_v2", epochs=3)["epochs"] == 3 and training_recipe()["milestones"] == ()
    ds = make_synthetic(2, size=16, n=(24, 6, 6), seed=0, clutter=1)
    _, info = train_backbone(ds, replace(QUICKSTART, epochs=3, milestones=(1, 2)), cache_dir=tmp_path, progress=False)
    assert [h["lr"] for h in info.history] == pytest.approx([1e-3, 1e-4, 1e-5])


# ----------------------------------------------------------------------------- units: cache key, embed, weights


def test_cache_key_ignores_init_auto_and_follows_every_setting():
    """init='auto' keeps the key that checkpoints had before the option existed (the blob
    without 'init'); every other setting, the architecture and the data change it."""
    import hashlib
    import json
    from dataclasses import asdict

    ds = make_synthetic(2, size=16, n=(6, 4, 4), seed=0, clutter=1)
    s = TrainSettings(arch="small", epochs=2, batch_size=16, lr=1e-3, seed=0)
    # the batches at their 28-px value (128), whole-batch training and amp off are left out too, as before they were settings
    legacy = {k: v for k, v in asdict(s).items() if k not in ("init", "infer_batch", "bn_batch", "micro_batch", "amp")}
    blob = json.dumps({"data": ds.fingerprint, "arch": "small", "settings": legacy, "code": bb._CODE_VERSION}, sort_keys=True)
    key = bb.backbone_key(ds, s, "small")
    assert key == hashlib.sha256(blob.encode()).hexdigest()[:20]
    assert bb.backbone_key(ds, replace(s), "small") == key  # the same inputs, the same key
    assert bb.backbone_key(ds, replace(s, infer_batch=128, bn_batch=128), "small") == key
    changed = [
        bb.backbone_key(ds, replace(s, **change), "small")
        for change in ({"init": "pretrained"}, {"epochs": 3}, {"batch_size": 8}, {"lr": 2e-3},
                       {"seed": 1}, {"milestones": (1,)}, {"infer_batch": 8}, {"bn_batch": 8}, {"micro_batch": 8})
    ]
    changed += [bb.backbone_key(ds, s, "resnet18"), bb.backbone_key(replace(ds, fingerprint=ds.fingerprint + "x"), s, "small")]
    assert key not in changed and len(set(changed)) == len(changed)
    # the small CNN has no pretrained weights: "scratch" is the network "auto" trains, and reuses it;
    # for ResNet-18, whose weights may be on disk, the two stay apart
    assert bb.backbone_key(ds, replace(s, init="scratch"), "small") == key
    assert bb.backbone_key(ds, replace(s, init="scratch"), "resnet18") != bb.backbone_key(ds, s, "resnet18")


def test_a_trained_backbone_is_cached_under_its_key(tmp_path):
    ds = make_synthetic(2, size=16, n=(12, 6, 6), seed=0, clutter=1)
    s = replace(QUICKSTART, epochs=1)
    _, first = train_backbone(ds, s, cache_dir=tmp_path, progress=False)
    model, again = train_backbone(ds, s, cache_dir=tmp_path, progress=False)
    assert not first.cached and again.cached and again.cache_key == first.cache_key
    assert (tmp_path / "backbones" / f"{first.cache_key}.pt").is_file()
    _, other = train_backbone(ds, replace(s, seed=1), cache_dir=tmp_path, progress=False)
    assert not other.cached and other.cache_key != first.cache_key


@pytest.mark.parametrize("ndim, side", [(2, 16), (3, 8)])
def test_embed_is_the_pooled_input_of_the_classifier(ndim, side):
    torch.manual_seed(0)
    model, _ = bb.build_backbone("small", ndim, 3, side, init="scratch")
    model.eval()
    x = np.random.default_rng(0).random((5, 1, *([side] * ndim)), dtype=np.float32)
    e = bb.embed(model, x)
    assert e.shape == (5, model.net.fc.in_features) and e.dtype == np.float32
    np.testing.assert_allclose(bb.embed(model, x, batch_size=2), e, rtol=1e-5, atol=1e-6)  # batching changes nothing
    with torch.no_grad():  # the classifier applied to the embedding gives the model's logits
        logits = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(model.net.fc(torch.from_numpy(e)).numpy(), logits, rtol=1e-4, atol=1e-5)
    assert bb.embed(model, x[:0]).shape == (0, 0)


def test_pretrained_weights_file_says_why_there_is_none(tmp_path, monkeypatch):
    path, why = bb.pretrained_weights_file("small")
    assert path is None and why == "the 'small' backbone has no pretrained weights (use resnet18 in 2D or r3d18 in 3D)"
    with pytest.raises(bb.TopoCAMError, match=r"backbone init 'pretrained': the 'small' backbone has no pretrained weights"):
        bb.build_backbone("small", 2, 2, 16, init="pretrained")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub: nothing on disk
    path, why = bb.pretrained_weights_file("resnet18")
    expected = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    assert path is None and why.startswith(f"pretrained weight file {expected} is absent (download https://")
    expected.parent.mkdir()
    expected.write_bytes(b"")
    assert bb.pretrained_weights_file("resnet18") == (expected, f"pretrained weights from {expected}")
