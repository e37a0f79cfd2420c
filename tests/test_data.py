import hashlib
from dataclasses import replace

import numpy as np
import pytest

from topocam.core.data import SPLITS, load_dataset, load_medmnist, load_npz, make_synthetic, validate_arrays
from topocam.core.errors import TopoCAMError

from .conftest import medmnist_file


def _arrays(n=6, shape=(12, 12), dtype=np.uint8):
    rng = np.random.default_rng(0)
    out = {}
    for s in SPLITS:
        out[f"{s}_images"] = rng.integers(0, 255, size=(n, *shape)).astype(dtype)
        out[f"{s}_labels"] = (np.arange(n) % 2).reshape(-1, 1)
    return out


def test_own_npz_roundtrip(tmp_path):
    p = tmp_path / "mine.npz"
    np.savez(p, **_arrays())
    ds = load_npz(p)
    assert ds.ndim == 2 and ds.n_classes == 2 and ds.task == "binary-class"
    assert ds.x["train"].shape == (6, 1, 12, 12) and ds.x["train"].dtype == np.float32
    x = np.asarray(ds.x["train"])
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert load_dataset(str(p)).fingerprint == ds.fingerprint


@pytest.mark.parametrize("dtype, scale, channels", [(np.uint8, 255.0, 1), (np.uint16, 65535.0, 1), (np.uint8, 255.0, 3)])
def test_integer_images_are_read_a_chunk_at_a_time_as_the_whole_conversion(tmp_path, dtype, scale, channels):
    """Integer images stay as stored (a quarter of float32's memory for uint8) and every
    selection reads back as float32 equal, bit for bit, to converting the whole array;
    the fingerprint hashes those float32 bytes, as it did when the whole split was converted."""
    from topocam.core.data import SPLITS, images_in

    rng = np.random.default_rng(0)
    shape = (7, 9, 9, 3) if channels == 3 else (7, 9, 9)
    arrays = {f"{s}_images": rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True, dtype=dtype) for s in SPLITS}
    arrays["train_images"][0, 0, 0] = np.iinfo(dtype).max  # the extremes convert exactly
    arrays["train_images"][0, 0, 1] = 0
    arrays |= {f"{s}_labels": np.arange(7)[:, None] % 2 for s in SPLITS}
    np.savez(tmp_path / "ints.npz", **arrays)
    ds = load_npz(tmp_path / "ints.npz")
    raw = arrays["train_images"]
    whole = raw.astype(np.float32) / scale  # what loading did before images were kept as stored
    whole = np.moveaxis(whole, -1, 1) if channels == 3 else whole[:, None]
    x = ds.x["train"]
    assert ds.x["train"].nbytes == raw.nbytes and x.shape == whole.shape and len(x) == 7
    assert np.asarray(x).tobytes() == whole.tobytes()
    for sel in (slice(2, 5), np.array([6, 0, 3]), 4):
        assert x[sel].dtype == np.float32 and x[sel].tobytes() == whole[sel].tobytes()
    assert images_in(x, 1, 4).flags.c_contiguous and images_in(x, 1, 4).tobytes() == whole[1:4].tobytes()
    gray = whole[:, 0] if channels == 1 else whole.mean(axis=1)
    assert ds.gray("train", 2, 6).tobytes() == gray[2:6].tobytes() and ds.gray("train").tobytes() == gray.tobytes()
    h = hashlib.sha256()
    for s in SPLITS:
        w = arrays[f"{s}_images"].astype(np.float32) / scale
        h.update(np.ascontiguousarray(np.moveaxis(w, -1, 1) if channels == 3 else w[:, None]).tobytes())
        h.update((np.arange(7) % 2).astype(np.int64).tobytes())
    assert ds.fingerprint == f"ints-{h.hexdigest()[:16]}"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.pop("val_labels"), "missing key"),
        (lambda a: a.__setitem__("train_images", a["train_images"].astype(np.float32) * np.nan), "NaN or Inf"),
        (lambda a: a.__setitem__("test_images", a["test_images"][:0]), "empty"),
        (lambda a: a.__setitem__("val_labels", a["val_labels"][:3]), "labels"),
        (lambda a: a.__setitem__("val_images", np.zeros((6, 10, 10), np.uint8)), "differ in image shape"),
        (lambda a: a.__setitem__("train_labels", -a["train_labels"]), "negative"),
        (lambda a: [a.__setitem__(f"{s}_labels", np.zeros((6, 1), int)) for s in SPLITS], "at least 2 classes"),
        (lambda a: a.__setitem__("train_labels", np.zeros((6, 1), int)), "never occur in the training split"),
        (lambda a: a.__setitem__("train_images", a["train_images"].astype(np.int32)), "dtype"),
        (lambda a: a.__setitem__("train_labels", np.zeros((6, 3), int)), "multi-label"),
    ],
)
def test_bad_arrays_are_clear_errors(mutate, message):
    a = _arrays()
    mutate(a)
    with pytest.raises(TopoCAMError, match=message):
        validate_arrays(a, "x.npz")


def test_corrupt_npz(tmp_path):
    p = tmp_path / "broken.npz"
    p.write_bytes(b"not a zip file")
    with pytest.raises(TopoCAMError, match="cannot read as .npz"):
        load_npz(p)


def test_missing_medmnist_file_names_file_folder_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPOCAM_OFFLINE", "1")
    with pytest.raises(TopoCAMError) as e:
        load_medmnist("pneumoniamnist", data_dir=tmp_path)
    msg = str(e.value)
    assert "pneumoniamnist.npz" in msg and str(tmp_path) in msg and "--data-dir" in msg and "MD5" in msg


def test_md5_mismatch_is_rejected(tmp_path):
    np.savez(tmp_path / "breastmnist.npz", **_arrays())
    with pytest.raises(TopoCAMError, match="does not match medmnist's published"):
        load_medmnist("breastmnist", data_dir=tmp_path)


def test_unknown_names():
    with pytest.raises(TopoCAMError, match="unknown dataset"):
        load_dataset("cifar10")
    with pytest.raises(TopoCAMError, match="not a MedMNIST size"):
        load_medmnist("breastmnist", size=32)
    with pytest.raises(TopoCAMError, match="unknown dataset"):
        load_dataset("chestmnist")  # multi-label: not a classification set we support


@pytest.mark.parametrize("ndim", [2, 3])
def test_synthetic_is_seeded_balanced_and_has_lesions(ndim):
    a = make_synthetic(ndim, size=16, n=(10, 4, 4), seed=3)
    b = make_synthetic(ndim, size=16, n=(10, 4, 4), seed=3)
    c = make_synthetic(ndim, size=16, n=(10, 4, 4), seed=4)
    assert np.array_equal(a.x["train"], b.x["train"]) and not np.array_equal(a.x["train"], c.x["train"])
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.ndim == ndim and a.x["train"].shape == (10, 1) + (16,) * ndim
    assert np.bincount(a.y["train"]).tolist() == [5, 5]
    for img, m in zip(a.gray("train"), a.lesion_masks["train"]):
        assert m.any() and img[m].mean() > img[~m].mean() + 0.2


def _objects(img: np.ndarray) -> list[tuple[int, bool]]:
    """(size, has a hole) of each bright object of an image (8/26-connected)."""
    from scipy import ndimage

    full = np.ones((3,) * img.ndim, dtype=bool)
    lab, n = ndimage.label(img > 0.5, structure=full)
    out = []
    for i in range(1, n + 1):
        obj = lab == i
        filled = ndimage.binary_fill_holes(obj)
        out.append((int(filled.sum()), bool((filled & ~obj).any())))
    return out


@pytest.mark.parametrize("ndim,size", [(2, 24), (3, 20)])
def test_synthetic_lesion_is_the_largest_object_and_holes_are_label_independent(ndim, size):
    """By construction: 1 + clutter separate objects; the same number of holes whatever the
    label; the label says only whether the LARGEST object (the lesion) holds one."""
    clutter = 2
    ds = make_synthetic(ndim, size=size, n=(16, 2, 2), seed=0, clutter=clutter)
    for img, mask, y in zip(ds.gray("train"), ds.lesion_masks["train"], ds.y["train"]):
        objs = sorted(_objects(img), reverse=True)
        assert len(objs) == 1 + clutter, objs
        assert sum(h for _, h in objs) == 1, objs  # holed_objects(2) == 1, for both labels
        assert objs[0][1] == bool(y), (objs, y)  # the lesion has the hole iff label 1
        # ... and the mask is that object as drawn, its hole included (what an ROI's Betti error is measured against)
        assert _objects(np.where(mask, 1.0, 0.0)) == [objs[0]], (objs, y)
        assert np.array_equal(mask, (img > 0.5) & mask)


def test_synthetic_premise_holds_whole_image_topology_carries_no_class_signal():
    """The premise of TopoCAM, measured: a classifier on the whole image's Betti curves is
    near chance, the same features restricted to the lesion separate the classes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from topocam.core.roi import segment

    from topocam.core.topology import BettiGrid, features_from_filtrations, roi_counts

    ds = make_synthetic(2, size=24, n=(240, 2, 2), seed=5)
    x, y, lesion = ds.gray("train"), ds.y["train"], ds.lesion_masks["train"]
    auc = {}
    for name, mask in (("whole", np.ones_like(lesion)), ("lesion", lesion)):
        f = segment(x, mask, "zero")
        feats = features_from_filtrations(f, roi_counts(mask), BettiGrid.fit(f, 30), backend="fast", n_jobs=1)
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        auc[name] = cross_val_score(clf, feats, y, cv=5, scoring="roc_auc").mean()
    assert auc["whole"] < 0.68 and auc["lesion"] > 0.95, auc


def test_synthetic_fingerprint_is_the_content_and_data_seed_is_not_the_model_seed():
    from topocam.core.data import _hash_arrays
    from topocam.core.pipeline import TopoCAMConfig, load_data

    a = make_synthetic(2, size=16, n=(6, 2, 2), seed=0, clutter=1)
    assert a.fingerprint.endswith(_hash_arrays(a.x, a.y))
    assert make_synthetic(2, size=16, n=(6, 2, 2), seed=0, clutter=2).fingerprint != a.fingerprint
    cfg = TopoCAMConfig(dataset="synthetic2d", size=16, synthetic_n=(6, 2, 2), clutter=1)
    same = [load_data(replace(cfg, seed=s)) for s in (0, 7)]  # model seeds differ, the images do not
    assert same[0].fingerprint == same[1].fingerprint == a.fingerprint
    assert load_data(replace(cfg, data_seed=1)).fingerprint != a.fingerprint


def test_synthetic_clutter_and_crowding_errors_are_clear():
    with pytest.raises(TopoCAMError, match="clutter must be >= 1"):
        make_synthetic(2, size=24, n=(4, 2, 2), clutter=0)
    with pytest.raises(TopoCAMError, match="lower clutter or raise size"):
        make_synthetic(2, size=12, n=(4, 2, 2), clutter=6)


def test_breastmnist_official_file_loads_with_md5():
    path = medmnist_file("breastmnist.npz")
    ds = load_medmnist("breastmnist", data_dir=path.parent)
    assert {s: len(ds.y[s]) for s in SPLITS} == {"train": 546, "val": 78, "test": 156}
    assert ds.ndim == 2 and ds.task == "binary-class"
    assert hashlib.md5(path.read_bytes()).hexdigest() == "750601b1f35ba3300ea97c75c52ff8f6"
