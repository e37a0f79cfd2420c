"""Shipping the best configuration: the exported model, its inputs, and `topocam predict`.

Real components throughout: SQLite Optuna storages and a SQLite MLflow store
with its model registry (the ``shipped`` fixture), a fresh Python process
loading ``models:/NAME@champion``, real image files (PNG, JPEG, NPY, NIfTI).
The HTTP server and the web page are in test_serving.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import optuna
import pytest
from PIL import Image

from topocam.deploy.files import read_image
from topocam.deploy.inputs import InputSpec, as_batch, luma
from topocam.core.errors import TopoCAMError

from .shipping import MODEL, REPO, cli

SPEC2D = InputSpec((16, 16), 1)


# ------------------------------------------------------------------ the model


def _client(shipped):
    from mlflow import MlflowClient

    return MlflowClient(shipped.tracking_uri, registry_uri=shipped.tracking_uri)


def test_export_chooses_the_best_validation_trial_over_samplers_and_seeds(shipped):
    storage = optuna.storages.RDBStorage(shipped.storage)
    values = {}
    for s in optuna.get_all_study_summaries(storage):
        for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False):
            if t.state == optuna.trial.TrialState.COMPLETE:
                values[(s.study_name, t.number)] = t.value
    assert {k[0] for k in values} == {"shiptiny.random.s0", "shiptiny.tpe.s1"}
    c = shipped.result.choice
    assert c.value == max(values.values()) == values[(c.optuna_study, c.trial)]
    # the refit on the study's context reproduces the trial's objective exactly
    assert shipped.result.val["auc"] == c.value
    # restricted to one sampler: the best of that sampler's trials
    from topocam.deploy.export import choose_trial

    only = choose_trial(shipped.spec, shipped.storage, sampler="tpe")
    assert only.optuna_study == "shiptiny.tpe.s1"
    assert only.value == max(v for (name, _), v in values.items() if name == "shiptiny.tpe.s1")


def test_registered_version_alias_run_link_and_contents(shipped, tmp_path):
    import mlflow

    client = _client(shipped)
    res = shipped.result
    mv = client.get_model_version_by_alias(MODEL, "champion")
    assert int(mv.version) == res.version == 1
    # linked to the study's best run of the chosen (sampler, seed): the run the trial's test metrics were logged in
    run = client.get_run(mv.run_id)
    assert run.data.tags["kind"] == "best" and run.data.tags["trial"] == str(res.choice.trial)
    assert run.data.tags["sampler"] == res.choice.sampler and run.data.tags["seed"] == str(res.choice.seed)
    assert run.data.tags["exported_model"] == f"{MODEL}/1"
    assert mv.tags["trial"] == str(res.choice.trial) and mv.tags["study"] == "shiptiny"

    mlflow.set_tracking_uri(shipped.tracking_uri)
    info = mlflow.models.get_model_info(shipped.uri)
    assert info.signature is not None and info.signature.outputs.input_names() == ["class", "probabilities", "roi_fraction"]
    assert info.saved_input_example_info is not None
    assert info.metadata["topocam"]["shape"] == [16, 16] and info.metadata["topocam"]["trial"] == res.choice.trial

    local = mlflow.artifacts.download_artifacts(shipped.uri, dst_path=str(tmp_path / "model"))
    from pathlib import Path

    bundle_dir = next(Path(local).rglob("topocam.json")).parent
    meta = json.loads((bundle_dir / "topocam.json").read_text())
    p = meta["provenance"]
    assert (p["study"], p["sampler"], p["seed"], p["trial"]) == ("shiptiny", res.choice.sampler, res.choice.seed, res.choice.trial)
    assert p["val"]["auc"] == res.val["auc"] and p["test"]["auc"] == res.test["auc"]
    assert meta["cam"]["variant"] == res.choice.params["cam"] and meta["cam"]["target"] == "predicted"
    assert meta["cam"]["layers"] == ["layer2", "layer3", "layer4"]
    assert meta["tau"] == res.choice.params["tau"] and meta["outside"] == "exclude"
    assert abs(sum(meta["cam"]["weights"]) - 1) < 1e-12

    # the exported Betti grid IS the one fitted on the training split (and not on val or test)
    from topocam.core.pipeline import prepare, roi_for
    from topocam.search.space import apply_params
    from topocam.core.roi import segment
    from topocam.core.topology import BettiGrid

    ctx = prepare(shipped.spec.base, progress=False)
    cfg = apply_params(shipped.spec.base, res.choice.params)
    grids = {s: BettiGrid.fit(segment(ctx.gray(s), roi_for(ctx, cfg, s)[1], cfg.outside), cfg.bins).thresholds
             for s in ("train",)}
    with np.load(bundle_dir / "arrays.npz") as z:
        exported = z["thresholds"]
    assert np.array_equal(exported, grids["train"])
    # (on these synthetic images every split's ROI spans [0, 1], so the three grids coincide;
    # that the grid is fitted on train only is tested in test_pipeline_protocol.py)

    # the input example is synthetic, not a patient's (training) image
    example = np.array(json.loads(next(Path(local).rglob("serving_input_example.json")).read_text())["inputs"])
    assert example.shape == (1, 16, 16)
    train = shipped.uint8("train")
    assert not any(np.array_equal(example[0], im) for im in train)


FRESH = """
import sys, numpy as np, mlflow
m = mlflow.pyfunc.load_model(sys.argv[1])
for split in ("val", "test"):
    x = np.load(sys.argv[2] + f"/{split}.npy")
    out = m.predict(x)
    np.save(sys.argv[2] + f"/{split}_probs.npy", np.array([r["probabilities"] for r in out]))
    np.save(sys.argv[2] + f"/{split}_roi.npy", np.array([r["roi_fraction"] for r in out]))
print("classes", sorted({r["class"] for r in out}))
"""


def test_fresh_process_load_gives_the_pipelines_probabilities(shipped, tmp_path):
    for split in ("val", "test"):
        np.save(tmp_path / f"{split}.npy", shipped.data.x[split][:, 0])  # (N, H, W) float in [0, 1]
    r = subprocess.run([sys.executable, "-c", FRESH, shipped.uri, str(tmp_path)], env=shipped.env(), capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    from topocam.core.pipeline import prepare, roi_for
    from topocam.search.space import apply_params

    ctx = prepare(shipped.spec.base, progress=False)
    cfg = apply_params(shipped.spec.base, shipped.result.choice.params)
    for split in ("val", "test"):
        got = np.load(tmp_path / f"{split}_probs.npy")
        ref = shipped.result.reference[split]
        assert got.shape == ref.shape == (16, 2)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
        masks = roi_for(ctx, cfg, split)[1]  # the pipeline's ROIs (empty ones included: fraction 0)
        assert np.array_equal(np.load(tmp_path / f"{split}_roi.npy"), masks.reshape(len(masks), -1).mean(axis=1))


def test_uint8_and_float_inputs_agree_and_layouts_are_accepted(shipped):
    from topocam.deploy.serve import load_model

    model, inner = load_model(shipped.uri, shipped.tracking_uri)
    u8 = shipped.uint8("test")[:4]
    by_u8 = model.predict(u8)
    by_float = model.predict(u8.astype(np.float32) / 255.0)
    by_channel = model.predict(u8[..., None])
    by_rgb = model.predict(np.repeat(u8[..., None], 3, axis=-1))  # gray as RGB: luma of equal channels is the gray
    assert len(by_u8) == 4
    for r in by_u8:
        assert set(r) == {"class", "probabilities", "roi_fraction"} and abs(sum(r["probabilities"]) - 1) < 1e-5
        assert r["class"] == int(np.argmax(r["probabilities"]))
    assert by_u8 == by_float == by_channel == by_rgb
    # one image alone gives what it gives inside a batch (to float precision)
    alone = model.predict(u8[2:3])[0]
    np.testing.assert_allclose(alone["probabilities"], by_u8[2]["probabilities"], atol=1e-5)


# --------------------------------------------------------------------- inputs


def test_as_batch_converts_like_the_training_data():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
    x = as_batch(u8, SPEC2D)
    assert x.shape == (3, 1, 16, 16) and x.dtype == np.float32
    assert np.array_equal(x[:, 0], u8.astype(np.float32) / 255.0)  # data.py's arithmetic, bit for bit
    assert np.array_equal(as_batch(u8.astype(np.int64), SPEC2D), x)  # whole numbers 0-255 (JSON integers)
    assert np.array_equal(as_batch(np.array(u8.tolist(), dtype=object), SPEC2D), x)  # what JSON parsing gives
    rgb = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    pil_gray = np.stack([np.array(Image.fromarray(im, "RGB").convert("L")) for im in rgb])
    assert np.array_equal(luma(rgb), pil_gray)  # the same luma as Pillow's convert("L")
    assert np.array_equal(as_batch(rgb, SPEC2D)[:, 0], pil_gray.astype(np.float32) / 255.0)
    colour = as_batch(u8[..., None], InputSpec((16, 16), 3))
    assert colour.shape == (3, 3, 16, 16) and np.array_equal(colour[:, 1], x[:, 0])
    vol = as_batch(rng.random((2, 8, 8, 8)), InputSpec((8, 8, 8), 1))
    assert vol.shape == (2, 1, 8, 8, 8)


@pytest.mark.parametrize(
    "images, words",
    [
        (np.zeros((16, 16), np.uint8), ["single image", "wrap it"]),
        (np.zeros((2, 16, 16, 5), np.uint8), ["wrong rank", "(2, 16, 16, 5)"]),
        (np.zeros((2, 2, 16, 16), np.uint8), ["wrong rank"]),
        (np.zeros((2, 20, 20), np.uint8), ["wrong size", "20×20", "16×16"]),
        (np.zeros((0, 16, 16), np.uint8), ["empty batch"]),
        (np.array([[["a"] * 16] * 16], dtype=object), ["numbers only", "'a'"]),
        (np.array([[[None] * 16] * 16], dtype=object), ["numbers only", "None"]),
        (np.zeros((1, 16, 16), bool), ["booleans"]),
        (np.full((1, 16, 16), 2.5), ["[0, 1]", "2.5"]),
        (np.full((1, 16, 16), 300, np.int64), ["0-255", "300"]),
        (np.full((1, 16, 16), np.nan), ["NaN"]),
        (np.array("abc"), ["single value"]),
    ],
)
def test_as_batch_rejects_bad_input_with_a_specific_message(images, words):
    with pytest.raises(TopoCAMError) as exc:
        as_batch(images, SPEC2D)
    for w in words:
        assert w in str(exc.value), f"{w!r} not in {exc.value}"


def test_ragged_nested_lists_are_rejected():
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = [1, 2], [1]
    with pytest.raises(TopoCAMError, match="different lengths"):
        as_batch(ragged, SPEC2D)


# ---------------------------------------------------------------------- files


def test_read_image_formats_and_preparation(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(16, 16), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    np.save(tmp_path / "a.npy", img)
    np.save(tmp_path / "f.npy", img.astype(np.float32) / 255.0)
    for name in ("a.png", "a.npy"):  # at the model's size: untouched, bit for bit
        got = read_image(tmp_path / name, SPEC2D)
        assert got.array.dtype == np.uint8 and np.array_equal(got.array, img) and got.steps == []
    assert np.array_equal(read_image(tmp_path / "f.npy", SPEC2D).array, img.astype(np.float32) / 255.0)

    rgb = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    got = read_image(tmp_path / "rgb.png", SPEC2D)
    assert np.array_equal(got.array, np.array(Image.fromarray(rgb).convert("L"))) and "luma" in got.steps[0]

    # a 64x48 (W x H) photo: the centred 48x48 square is resized to 16x16 with bicubic
    wide = rng.integers(0, 256, size=(48, 64), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.jpg", quality=100)
    got = read_image(tmp_path / "wide.jpg", SPEC2D)
    jpeg = np.array(Image.open(tmp_path / "wide.jpg").convert("L"))
    expected = np.array(Image.fromarray(jpeg[:, 8:56]).resize((16, 16), Image.Resampling.BICUBIC))
    assert got.array.shape == (16, 16) and np.array_equal(got.array, expected)
    assert any("centre-cropped" in s for s in got.steps) and any("bicubic" in s for s in got.steps)

    # 16-bit PNG and a signed CT-like array: 16-bit divided by 65535; other ranges min-max scaled
    Image.fromarray((img.astype(np.uint16) * 257)).save(tmp_path / "deep.png")
    np.testing.assert_allclose(read_image(tmp_path / "deep.png", SPEC2D).array, img / 255.0, atol=1e-6)
    hu = rng.integers(-1000, 1000, size=(16, 16)).astype(np.int16)
    np.save(tmp_path / "hu.npy", hu)
    got = read_image(tmp_path / "hu.npy", SPEC2D)
    assert got.array.min() == 0.0 and got.array.max() == 1.0 and "min-max" in got.steps[-1]


def test_read_nifti_volumes_round_trip(tmp_path):
    import nibabel as nib

    spec3 = InputSpec((8, 8, 8), 1)
    vol = np.random.default_rng(2).integers(0, 256, size=(8, 8, 8), dtype=np.uint8)
    for name in ("v.nii", "v.nii.gz"):
        nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / name)
        got = read_image(tmp_path / name, spec3)
        assert got.array.dtype == np.uint8 and np.array_equal(got.array, vol)
    big = np.random.default_rng(3).random((16, 16, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(big, np.eye(4)), tmp_path / "big.nii.gz")
    got = read_image(tmp_path / "big.nii.gz", spec3)
    assert got.array.shape == (8, 8, 8) and "trilinear" in got.steps[-1]
    assert 0.0 <= got.array.min() and got.array.max() <= 1.0


def _npy(array):
    return lambda p: (np.save(p / "x.npy", array), p / "x.npy")[1]


def _bytes(name: str, data: bytes):
    return lambda p: ((p / name).write_bytes(data), p / name)[1]


def _png(p):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(p / "x.png")
    return p / "x.png"


SPEC3D = InputSpec((8, 8, 8), 1)


@pytest.mark.parametrize(
    "make, spec, words",
    [
        (_npy(np.zeros((16, 16, 16))), SPEC2D, ["3 dimension", "2D images"]),
        (_png, SPEC3D, [".png files are 2D images", "3D volumes"]),
        (_npy(np.zeros((8, 8))), SPEC3D, ["2 dimension", "3D volumes"]),
        (_bytes("x.png", b"not a png"), SPEC2D, ["cannot read as an image"]),
        (_bytes("x.npy", b"\x93NUMPY garbage"), SPEC2D, ["cannot read as .npy"]),
        (_bytes("x.nii.gz", b"garbage"), SPEC3D, ["cannot read as NIfTI"]),
        (_bytes("x.bmp", b"BM"), SPEC2D, ["unsupported file type '.bmp'"]),
        (lambda p: p / "missing.png", SPEC2D, ["does not exist"]),
        (_npy(np.zeros((16, 16), bool)), SPEC2D, ["boolean"]),
    ],
)
def test_read_image_rejects_bad_files(tmp_path, make, spec, words):
    path = make(tmp_path)
    with pytest.raises(TopoCAMError) as exc:
        read_image(path, spec)
    for w in words:
        assert w in str(exc.value), f"{w!r} not in {exc.value}"


# -------------------------------------------------------------------- predict


def test_predict_cli_on_a_folder_of_files(shipped, tmp_path):
    from topocam.deploy.serve import load_model

    folder = tmp_path / "in"
    folder.mkdir()
    u8 = shipped.uint8("test")[:4]
    for i, im in enumerate(u8):
        Image.fromarray(im).save(folder / f"case{i}.png")
    np.save(folder / "volume.npy", np.zeros((16, 16, 16), np.float32))  # wrong dimensionality
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    (folder / "notes.txt").write_text("not an image")  # not picked up from a folder
    out = tmp_path / "out"
    r = cli("predict", str(folder), str(tmp_path / "missing.npy"), "--model", shipped.uri, "--out", str(out), "--quiet",
            env=shipped.env())
    assert r.returncode == 1, r.stdout + r.stderr  # some files failed
    assert "Traceback" not in r.stderr
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [x["file"].split("/")[-1] for x in lines] == [
        "broken.png", "case0.png", "case1.png", "case2.png", "case3.png", "volume.npy", "missing.npy"]
    by_name = {x["file"].split("/")[-1]: x for x in lines}
    assert "cannot read as an image" in by_name["broken.png"]["error"]
    assert "3 dimension" in by_name["volume.npy"]["error"]
    assert "does not exist" in by_name["missing.npy"]["error"]
    model, _ = load_model(shipped.uri, shipped.tracking_uri)
    for i in range(4):
        rec = by_name[f"case{i}.png"]
        want = model.predict(u8[i : i + 1])[0]  # the same image as an array: the same answer
        assert rec["class"] == want["class"] and rec["probabilities"] == want["probabilities"]
        assert rec["roi_fraction"] == want["roi_fraction"] and rec["preprocessing"] == []
        assert rec["class_name"] in ("solid lesion", "lesion with hole/cavity")
        overlay = Image.open(out / rec["overlay"])
        assert overlay.format == "PNG" and min(overlay.size) >= 200
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [f"case{i}.png" for i in range(4)]
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    for bad in ("broken.png", "volume.npy", "missing.npy"):
        assert bad in r.stderr

    ok = cli("predict", str(folder / "case0.png"), "--model", shipped.uri, "--out", str(tmp_path / "out2"), "--quiet",
             env=shipped.env())
    assert ok.returncode == 0, ok.stderr


def test_predict_cli_bad_model_is_one_line(shipped, tmp_path):
    r = cli("predict", str(tmp_path), "--model", "models:/no-such-model@champion", "--out", str(tmp_path / "o"),
            env=shipped.env())
    assert r.returncode != 0 and "cannot load model 'models:/no-such-model@champion'" in r.stderr
    assert "Traceback" not in r.stderr
    # no store anywhere: said so, and MLflow is not left to create ./mlflow.db
    env = shipped.env()
    env.pop("MLFLOW_TRACKING_URI")
    r = cli("predict", str(tmp_path), "--model", shipped.uri, "--out", str(tmp_path / "o"), "--runs-dir",
            str(tmp_path / "nowhere"), env=env, cwd=tmp_path)
    assert r.returncode != 0 and "needs an MLflow tracking store" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------- export (CLI)


def test_export_cli_adds_versions_and_moves_the_alias(shipped):
    from typer.testing import CliRunner

    from topocam.cli import app

    runner = CliRunner()
    base = ["export", str(shipped.study_file), "--runs-dir", str(shipped.runs), "--quiet"]
    first = runner.invoke(app, [*base, "--name", "tiny-cli"])
    assert first.exit_code == 0, first.output
    assert "registered tiny-cli version 1 (alias champion)" in first.output
    c = shipped.result.choice
    other = 0 if c.trial != 0 or c.optuna_study != "shiptiny.tpe.s1" else 1
    second = runner.invoke(app, [*base, "--name", "tiny-cli", "--sampler", "tpe", "--seed", "1", "--trial", str(other)])
    assert second.exit_code == 0, second.output
    assert f"from shiptiny.tpe.s1 trial {other}" in second.output
    client = _client(shipped)
    mv = client.get_model_version_by_alias("tiny-cli", "champion")
    assert int(mv.version) == 2 and mv.tags["trial"] == str(other)
    run = client.get_run(mv.run_id)
    assert run.data.tags["trial"] == str(other) and run.data.tags["kind"] in ("best", "export")


def test_export_cli_takes_both_stores_from_the_environment(shipped, tmp_path):
    """Only TOPOCAM_STORAGE and MLFLOW_TRACKING_URI set, as for `study run`: `export` used to
    declare --storage and --tracking-uri without them and stop with 'no study storage'."""
    from typer.testing import CliRunner

    from topocam.cli import app

    empty = tmp_path / "runs"  # holds neither store: both come from the environment
    r = CliRunner().invoke(app, ["export", str(shipped.study_file), "--name", "tiny-env", "--runs-dir", str(empty), "--quiet"],
                           env={"TOPOCAM_STORAGE": shipped.storage, "MLFLOW_TRACKING_URI": shipped.tracking_uri})
    assert r.exit_code == 0, r.output
    assert "registered tiny-env version 1 (alias champion)" in r.output
    assert f"tracking {shipped.tracking_uri}" in r.output
    assert f"serve: MLFLOW_TRACKING_URI={shipped.tracking_uri} topocam serve --model models:/tiny-env@champion" in r.output
    assert not empty.exists()  # no store was made under the runs folder
    mv = _client(shipped).get_model_version_by_alias("tiny-env", "champion")
    assert int(mv.version) == 1 and mv.tags["study"] == "shiptiny"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--name", "has space"], ["model name 'has space'"]),
        (["--name", "m", "--trial", "0"], ["--trial 0 is ambiguous", "--sampler and --seed"]),
        (["--name", "m", "--sampler", "tpe", "--seed", "1", "--trial", "99"], ["has no trial 99"]),
        (["--name", "m", "--sampler", "annealing"], ["Invalid value for '--sampler'", "'annealing' is not one of 'de'"]),
        (["--name", "m", "--sampler", "tpe", "--seed", "7"], ["no trials of study 'shiptiny' for sampler tpe and seed 7"]),
    ],
)
def test_export_cli_errors_are_one_line(shipped, args, words):
    from typer.testing import CliRunner

    from topocam.cli import app

    r = CliRunner().invoke(app, ["export", str(shipped.study_file), "--runs-dir", str(shipped.runs), "--quiet", *args])
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    for w in words:
        assert w in r.output, r.output


def test_export_refuses_a_changed_study_file(shipped, tmp_path):
    from topocam.deploy.export import choose_trial
    from topocam.search.studyfile import load_study

    changed = tmp_path / "shiptiny.toml"
    changed.write_text(shipped.study_file.read_text().replace("bins = 8", "bins = 9"))
    with pytest.raises(TopoCAMError, match="differs from the definition"):
        choose_trial(load_study(changed), shipped.storage)


def test_repo_root_on_subprocess_path(shipped):
    """Subprocesses import topocam from this repository (also in CI's fresh clone)."""
    r = subprocess.run([sys.executable, "-c", "import topocam.deploy, sys; print(topocam.deploy.__file__)"],
                       env=shipped.env(), capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0 and r.stdout.strip().startswith(str(REPO)), r.stdout + r.stderr
