"""Shared fixtures: tiny synthetic data and a small trained backbone (CPU-sized)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOPOCAM_OFFLINE", "1")  # never wait on the network in tests

SHARED_MEDMNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist"


def medmnist_file(name: str) -> Path:
    """Path of an official MedMNIST file in ../shared, or skip with a message."""
    path = SHARED_MEDMNIST / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: real-data test skipped (see ../shared/data/medmnist/README.md)")
    return path


_STORE_ENV = ("MLFLOW_TRACKING_URI", "TOPOCAM_STORAGE")


@pytest.fixture(autouse=True)
def _no_store_from_the_environment():
    """The CLI honours MLFLOW_TRACKING_URI / TOPOCAM_STORAGE, and mlflow.set_tracking_uri sets the
    former for the whole process: without this, one test's store leaks into the next test's
    runs (and into the workers it starts)."""
    saved = {k: os.environ.pop(k, None) for k in _STORE_ENV}
    yield
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("topocam-cache")


@pytest.fixture(scope="session")
def synth2d():
    from topocam.data import make_synthetic

    return make_synthetic(2, size=20, n=(80, 30, 30), seed=1)


@pytest.fixture(scope="session")
def base_config(cache_dir):
    from topocam.pipeline import TopoCAMConfig

    return TopoCAMConfig(
        dataset="synthetic2d", size=20, synthetic_n=(80, 30, 30), backbone="small", epochs=10, batch_size=16,
        seed=1, bins=12, mlp=(32, 16), betti_backend="fast", n_jobs=1, cache_dir=str(cache_dir),
    )


@pytest.fixture(scope="session")
def ctx2d(base_config, synth2d):
    """A context with a small backbone trained on synthetic 2D data."""
    from topocam.pipeline import prepare

    return prepare(base_config, progress=False, data=synth2d)


@pytest.fixture(scope="session")
def shipped(tmp_path_factory):
    """A tiny study searched by two samplers and exported as the registered model
    ``tiny-topocam`` (alias champion), in a real SQLite MLflow store; shared by the
    shipping tests (tests/shipping.py)."""
    from .shipping import make_shipped

    root = tmp_path_factory.mktemp("shipped")
    mp = pytest.MonkeyPatch()
    mp.setenv("TOPOCAM_CACHE_DIR", str(root / "cache"))
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        yield make_shipped(root)
    finally:
        mp.undo()
