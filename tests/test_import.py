"""``topocam data import``: real NIfTI, DICOM and PNG files written here, imported back."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from topocam.cli import app
from topocam.core.data import load_dataset
from topocam.core.scans import Preprocessing, prepare_file, read_scan
from topocam.deploy.files import read_image
from topocam.deploy.inputs import InputSpec

runner = CliRunner()
ADRENAL = Path("/work/shared/data/medmnist/adrenalmnist3d.npz")


def _labels(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _affines(n: int) -> list[tuple[np.ndarray, callable]]:
    """(affine, how a RAS volume is stored under it): RAS, LPS, permuted+flipped, anisotropic."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    perm = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])  # voxel axes (k, i, j) with i flipped
    aniso = np.diag([1.0, 1.0, 2.5, 1.0])
    return [
        (np.eye(4), lambda v: v),
        (lps, lambda v: v[::-1, ::-1, :]),
        (perm, lambda v: np.transpose(v, (1, 2, 0))[::-1]),
        (aniso, lambda v: v),
    ][:n]


def test_nifti_orientations_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    for affine, store in _affines(4):
        ras = rng.integers(0, 256, (8, 8, 8), dtype=np.uint8)
        stored = np.ascontiguousarray(store(ras))
        f = tmp_path / "v.nii.gz"
        nib.save(nib.Nifti1Image(stored, affine), str(f))
        scan = read_scan(f)
        assert np.array_equal(scan.array, ras), nib.aff2axcodes(affine)


def _write_volumes(tmp_path: Path, vols: np.ndarray, labels: np.ndarray, splits: list[str]) -> tuple[Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    affs = _affines(3)
    for i, (v, y, s) in enumerate(zip(vols, labels, splits)):
        aff, store = affs[i % len(affs)]
        nib.save(nib.Nifti1Image(np.ascontiguousarray(store(v)), aff), str(src / f"v{i}.nii.gz"))
        rows.append({"file": f"v{i}.nii.gz", "label": int(y), "split": s})
    return src, _labels(tmp_path / "labels.csv", rows)


def _toy(n=12, side=8):
    rng = np.random.default_rng(1)
    vols = rng.integers(0, 256, (n, side, side, side), dtype=np.uint8)
    labels = np.arange(n) % 2
    splits = ["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4)
    return vols, labels, splits


def test_import_volumes_loads_and_matches(tmp_path):
    vols, labels, splits = _toy()
    src, lab = _write_volumes(tmp_path, vols, labels, splits)
    out = tmp_path / "ds"
    r = runner.invoke(app, ["data", "import", str(src), "--labels", str(lab), "--out", str(out), "--size", "28", "--quiet"])
    assert r.exit_code == 0, r.output
    with np.load(out / "data.npz") as z:
        assert z["train_images"].shape == (6, 28, 28, 28) and z["train_labels"].shape == (6, 1)
    ds = load_dataset(str(out))
    assert ds.class_names == ["0", "1"] and ds.preprocessing["ndim"] == 3
    # the predict path prepares the same file bit-identically
    pre = Preprocessing.from_dict(ds.preprocessing)
    with np.load(out / "data.npz") as z:
        assert np.array_equal(prepare_file(src / "v1.nii.gz", pre), z["train_images"][1])
        # ... and so does deploy's reader, given the preprocessing a bundle carries (predict, serve, app)
        img = read_image(src / "v2.nii.gz", InputSpec(ds.shape, 1), ds.preprocessing)
        assert np.array_equal(img.array, z["train_images"][2]) and "reoriented" in " ".join(img.steps)
    assert (out / "manifest.csv").read_text().count("\n") == 13


@pytest.mark.skipif(not ADRENAL.is_file(), reason=f"{ADRENAL} not present")
def test_adrenal_volumes_round_trip_exactly(tmp_path):
    with np.load(ADRENAL) as z:
        vols = np.concatenate([z["train_images"][:4], z["val_images"][:4], z["test_images"][:4]])
        labels = np.concatenate([z["train_labels"][:4], z["val_labels"][:4], z["test_labels"][:4]])[:, 0]
    labels[:] = np.arange(12) % 2  # two classes in every split
    src, lab = _write_volumes(tmp_path, vols, labels, ["train"] * 4 + ["val"] * 4 + ["test"] * 4)
    out = tmp_path / "ds"
    r = runner.invoke(app, ["data", "import", str(src), "--labels", str(lab), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    with np.load(out / "data.npz") as z:
        got = np.concatenate([z["train_images"], z["val_images"], z["test_images"]])
    assert np.array_equal(got, vols)


def test_dicom_series_sorted_and_hu_windowed(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(2)
    hu = rng.integers(-200, 300, (8, 8, 8)).astype(np.int16)  # (slice, row, col), slices from inferior up
    series = tmp_path / "s"
    series.mkdir()
    for k in rng.permutation(8):
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = FileDataset(str(series / f"x{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.Modality = "CT"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.5 * k]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 2.5
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = (hu[k] + 1024).astype(np.uint16).tobytes()
        ds.save_as(str(series / f"x{k}.dcm"), enforce_file_format=True)
    scan = read_scan(series)
    # LPS (slice, row, col) -> RAS: x = col flipped (L->R), y = row flipped (P->A), z = slice
    ras = np.transpose(hu, (2, 1, 0))[::-1, ::-1, :]
    assert np.array_equal(scan.array, ras) and scan.spacing == (0.8, 0.8, 2.5)
    win = prepare_file(series, Preprocessing(size=8, ndim=3, window="auto"))
    assert np.array_equal(win, np.rint(np.clip((ras + 160) / 400, 0, 1) * 255).astype(np.uint8))
    (series / "x3.dcm").unlink()
    with pytest.raises(Exception, match="missing slice"):
        read_scan(series)


def test_pngs_8_16_rgb_rgba(tmp_path):
    a = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(a).save(tmp_path / "g8.png")
    Image.fromarray(a.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray(np.stack([a] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.concatenate([np.stack([a] * 3, -1), np.full((8, 8, 1), 7, np.uint8)], -1)).save(tmp_path / "rgba.png")
    pre = Preprocessing(size=8, ndim=2)
    for name in ("g8", "g16", "rgb", "rgba"):
        assert np.array_equal(prepare_file(tmp_path / f"{name}.png", pre), a), name


def _singular(vol: np.ndarray, path: Path) -> None:
    """A NIfTI whose sform (the affine nibabel takes) is all zeros: no orientation."""
    img = nib.Nifti1Image(vol, np.eye(4))
    img.set_qform(None, code=0)
    h = img.header
    for row in ("srow_x", "srow_y", "srow_z"):
        h[row] = [0, 0, 0, 0]
    h["sform_code"] = 1
    nib.Nifti1Image(vol, None, h).to_filename(str(path))


def test_bad_inputs_are_listed_and_exit_1(tmp_path):
    vols, labels, splits = _toy()
    src, lab = _write_volumes(tmp_path, vols, labels, splits)
    (src / "v0.nii.gz").write_bytes(b"not a nifti")
    _singular(vols[0], src / "v1.nii.gz")
    Image.fromarray(vols[0][0]).save(src / "flat.png")
    (src / "stray.nii.gz").write_bytes((src / "v2.nii.gz").read_bytes())
    rows = list(csv.DictReader(lab.read_text().splitlines()))
    rows += [{"file": "gone.nii.gz", "label": "0", "split": "train"}, {"file": "flat.png", "label": "1", "split": "train"},
             {"file": "v3.nii.gz", "label": "x", "split": "train"}]
    rows = [r for r in rows if r["file"] != "v3.nii.gz" or r["label"] == "x"]
    _labels(lab, rows)
    out = tmp_path / "ds"
    r = runner.invoke(app, ["data", "import", str(src), "--labels", str(lab), "--out", str(out), "--quiet"])
    assert r.exit_code == 1, r.output
    skipped = {row["file"]: row["reason"] for row in csv.DictReader((out / "skipped.csv").read_text().splitlines())}
    assert "cannot read as NIfTI" in skipped["v0.nii.gz"]
    assert "singular affine" in skipped["v1.nii.gz"]
    assert "2D and 3D mixed" in skipped["flat.png"] or "takes 3D" in skipped["flat.png"]
    assert "not in the labels" in skipped["stray.nii.gz"]
    assert "missing" in skipped["gone.nii.gz"]
    assert "not a class" in skipped["v3.nii.gz"]
    # --strict: fatal, and nothing (not even a temporary) is left
    out2 = tmp_path / "ds2"
    r = runner.invoke(app, ["data", "import", str(src), "--labels", str(lab), "--out", str(out2), "--strict", "--quiet"])
    assert r.exit_code == 2 and "--strict" in r.output
    assert not out2.exists() and not list(tmp_path.glob(".ds2*"))
    # refuse to overwrite
    r = runner.invoke(app, ["data", "import", str(src), "--labels", str(lab), "--out", str(out), "--quiet"])
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_one_class_split_and_patient_split(tmp_path):
    vols, labels, _ = _toy(20)
    src, lab = _write_volumes(tmp_path, vols, labels, ["train"] * 20)
    out = tmp_path / "ds"
    r = runner.invoke(app, ["data", "import", str(src), "--labels", str(lab), "--out", str(out), "--quiet"])
    assert r.exit_code == 2 and "split val" in r.output and not out.exists()
    rows = [{"file": f"v{i}.nii.gz", "label": str(int(labels[i])), "patient": f"p{i // 2}"} for i in range(20)]
    _labels(lab, rows)
    r = runner.invoke(app, ["data", "import", str(src), "--labels", str(lab), "--out", str(out), "--quiet", "--seed", "3"])
    assert r.exit_code == 0, r.output
    man = list(csv.DictReader((out / "manifest.csv").read_text().splitlines()))
    by_patient: dict[str, set[str]] = {}
    for m in man:
        by_patient.setdefault(m["patient"], set()).add(m["split"])
    assert all(len(s) == 1 for s in by_patient.values())


def test_imported_pngs_run_as_a_dataset(tmp_path):
    """`topocam run --dataset PATH` takes the imported folder as it takes an .npz."""
    rng = np.random.default_rng(4)
    src = tmp_path / "png"
    src.mkdir()
    rows = []
    for i in range(48):
        y = i % 2
        img = rng.integers(0, 60, (28, 28), dtype=np.uint8)
        img[8:20, 8:20] = 200 if y else 60
        Image.fromarray(img).save(src / f"i{i}.png")
        rows.append({"file": f"i{i}.png", "label": ["healthy", "lesion"][y]})
    lab = _labels(tmp_path / "labels.csv", rows)
    out = tmp_path / "ds"
    r = runner.invoke(app, ["data", "import", str(src), "--labels", str(lab), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert load_dataset(str(out)).class_names == ["healthy", "lesion"]
    r = runner.invoke(app, ["run", "--dataset", str(out), "--size", "28", "--backbone", "small", "--epochs", "2", "--batch-size", "16",
                            "--bins", "8", "--mlp", "16,8", "--quiet", "--seeds", "0", "--out", str(tmp_path / "run"),
                            "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "mlruns")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_predict_reads_nifti_in_ras_without_preprocessing(tmp_path):
    """Bundles without preprocessing (exported before import existed) read NIfTI in RAS too:
    the identity affine (how MedMNIST arrays are written) is unchanged, LPS is turned back."""
    ras = np.random.default_rng(5).integers(0, 256, (8, 8, 8), dtype=np.uint8)
    for affine, store in _affines(3):
        f = tmp_path / "v.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(store(ras)), affine), str(f))
        assert np.array_equal(read_image(f, InputSpec((8, 8, 8), 1)).array, ras)


def test_dataset_folder_by_bare_name_and_not_shadowing(tmp_path, monkeypatch):
    vols, labels, splits = _toy()
    src, lab = _write_volumes(tmp_path, vols, labels, splits)
    assert runner.invoke(app, ["data", "import", str(src), "--labels", str(lab), "--out", str(tmp_path / "mine"), "--quiet"]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    assert load_dataset("mine").name == "mine"
    (tmp_path / "breastmnist").mkdir()  # not an import: the MedMNIST name keeps its meaning
    from topocam.core.data import _is_path

    assert not _is_path("breastmnist")
