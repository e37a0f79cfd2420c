"""The device plumbing, on the CPU (no test needs a GPU): ``--device auto|cpu|cuda[:N]``,
``amp``, and that no tensor is read back to NumPy without passing through the CPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from topocam.cli import app
from topocam.core import backbone as bb
from topocam.core.data import make_synthetic
from topocam.core.errors import TopoCAMError
from topocam.core.settings import SETTINGS, TopoCAMConfig

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as one without a GPU, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_auto_picks_the_cpu_without_cuda(no_cuda):
    assert bb.resolve_device("auto") == torch.device("cpu")
    assert bb.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("value", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_line_naming_the_option(no_cuda, value):
    with pytest.raises(TopoCAMError, match=f"--device {value}") as e:
        bb.resolve_device(value)
    assert "\n" not in str(e.value) and "--device cpu" in str(e.value)


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "CPU", "", 0])
def test_bad_device_names_are_refused_with_the_choices(value):
    with pytest.raises(TopoCAMError, match="auto.*cpu.*cuda or cuda:N"):
        SETTINGS["device"].check(value)


@pytest.mark.parametrize("argv", [
    ["run", "--dataset", "synthetic2d", "--size", "16", "--device", "cuda", "--no-tracking"],
    ["study", "run", "studies/quickstart.toml", "--device", "cuda"],
    ["study", "compare", "studies/quickstart.toml", "--device", "cuda:0"],
    ["study", "prepare", "studies/quickstart.toml", "--device", "cuda"],
    ["ablate", "studies/quickstart.toml", "--device", "cuda"],
    ["export", "studies/quickstart.toml", "--name", "x", "--device", "cuda"],
    ["predict", "x.png", "--model", "nothing", "--device", "cuda"],
    ["app", "--model", "nothing", "--device", "cuda"],
    ["serve", "--model", "nothing", "--device", "cuda"],
])
def test_every_model_command_refuses_cuda_without_it_before_any_work(no_cuda, argv, tmp_path, monkeypatch):
    """One line, exit 2, and nothing made: no store, no output folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "quickstart.toml").write_text((REPO / "studies" / "quickstart.toml").read_text())
    (tmp_path / "studies" / "ablations").mkdir()
    (tmp_path / "studies" / "ablations" / "paper.toml").write_text((REPO / "studies" / "ablations" / "paper.toml").read_text())
    if argv[0] == "run":
        argv = [*argv, "--out", str(tmp_path / "out")]
    if argv[0] == "predict":
        argv = [*argv, "--out", str(tmp_path / "out")]
    r = runner.invoke(app, argv)
    text = r.output.strip()
    assert r.exit_code == 2, text
    assert "--device cuda" in text and len(text.splitlines()) == 1, text
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "out").exists()


def test_the_device_reaches_the_model_and_the_record_not_the_key(tmp_path, no_cuda):
    data = make_synthetic(2, size=16, n=(12, 6, 6), seed=0)
    s = bb.TrainSettings(arch="small", epochs=1, batch_size=4)
    model, info = bb.train_backbone(data, s, cache_dir=tmp_path, progress=False, device=bb.resolve_device("auto"))
    assert next(model.parameters()).device == torch.device("cpu")
    assert info.device == "cpu"  # recorded with the checkpoint
    # the key is a function of the recipe and the data only: a GPU-trained backbone is a CPU worker's too
    cpu, gpu = (TopoCAMConfig(backbone="small", epochs=1, batch_size=4, device=d).train_settings() for d in ("cpu", "cuda"))
    assert bb.backbone_key(data, cpu, "small") == bb.backbone_key(data, gpu, "small") == info.cache_key


def test_prepare_puts_the_backbone_on_the_configured_device(tmp_path, no_cuda):
    from topocam.core.pipeline import prepare

    cfg = TopoCAMConfig(dataset="synthetic2d", size=16, synthetic_n=(12, 6, 6), backbone="small", epochs=1, batch_size=4,
                        device="cpu", cache_dir=str(tmp_path), n_jobs=1)
    ctx = prepare(cfg, progress=False)
    assert next(ctx.model.parameters()).device.type == "cpu"
    with pytest.raises(TopoCAMError, match="--device cuda"):
        prepare(TopoCAMConfig(**{**cfg.as_dict(), "device": "cuda"}), progress=False)


def test_the_device_is_not_part_of_a_studys_definition():
    from dataclasses import replace

    from topocam.search.fingerprint import definition
    from topocam.search.studyfile import load_study

    spec = load_study(REPO / "studies" / "quickstart.toml")
    on_gpu = replace(spec, base=replace(spec.base, device="cuda"))
    assert definition(spec) == definition(on_gpu)


def test_amp_is_refused_where_the_backbone_would_train_on_the_cpu(tmp_path, no_cuda):
    data = make_synthetic(2, size=16, n=(12, 6, 6), seed=0)
    s = bb.TrainSettings(arch="small", epochs=1, batch_size=4, amp=True)
    with pytest.raises(TopoCAMError, match="amp.*CUDA only.*cpu"):
        bb.train_backbone(data, s, cache_dir=tmp_path, progress=False, device=torch.device("cpu"))
    assert not (tmp_path / "backbones").exists() or not any((tmp_path / "backbones").glob("*.pt"))
    # amp trains another backbone: it is in the key where on (and absent where off, as before it existed)
    plain = bb.backbone_key(data, bb.TrainSettings(arch="small", epochs=1, batch_size=4), "small")
    assert bb.backbone_key(data, s, "small") != plain
    assert TopoCAMConfig(amp=True).train_settings().amp is True and bb.training_recipe()["amp"] is False


def test_to_device_on_the_cpu_copies_nothing():
    import numpy as np

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = bb.to_device(a, torch.device("cpu"))
    assert t.device.type == "cpu" and t.data_ptr() == a.__array_interface__["data"][0]


def test_no_numpy_on_a_tensor_that_may_be_on_a_gpu():
    """Every ``.numpy()`` in the package follows ``.cpu()`` on its line, or says why its tensor
    is on the CPU (a ``# CPU tensor`` comment): a CUDA tensor's .numpy() raises."""
    offenders = []
    for path in sorted((REPO / "topocam").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"\.numpy\(\)", line):
                if ".cpu()" not in line[: m.start()] and "# CPU tensor" not in line:
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
