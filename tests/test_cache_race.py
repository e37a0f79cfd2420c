"""The backbone and CAM cache shared by processes on one machine (issue 13): one builds an
entry, the others wait and reuse it; no torn or temporary files; a truncated entry is named
and rebuilt. Real processes (spawn) on the tiny synthetic set of tests/test_study.py."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from topocam.core.errors import CorruptCacheWarning, TopoCAMError

VARIANT = "gradcam"
SLOW_S = 1.5  # each build is slowed by this much in the racing workers: the other one surely arrives meanwhile


def tiny_config(cache: Path):
    from topocam.core.pipeline import TopoCAMConfig

    return TopoCAMConfig(
        dataset="synthetic2d", size=16, synthetic_n=(40, 16, 16), backbone="small", epochs=2, batch_size=16,
        seed=0, n_jobs=1, cache_dir=str(cache),
    )


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def maps_digest(ctx) -> str:
    h = hashlib.sha256()
    for split in ("train", "val", "test"):
        for layer, m in sorted(ctx.cams(VARIANT, split).maps.items()):
            h.update(np.ascontiguousarray(m).tobytes())
    return h.hexdigest()


def _race(cache: str, log: str, barrier, queue) -> None:
    """One worker: prepare the backbone and the CAMs on the shared cache. Each real
    build appends a line to ``log`` (and is slowed, so that the race is certain)."""
    try:
        import time

        import topocam.core.backbone as backbone
        import topocam.core.pipeline as pipeline

        def counted(name, fn):
            def run(*args, **kwargs):
                with open(log, "a") as fh:
                    fh.write(f"{name} {os.getpid()}\n")
                time.sleep(SLOW_S)
                return fn(*args, **kwargs)

            return run

        backbone._fit = counted("train", backbone._fit)
        pipeline.compute_cams = counted("cams", pipeline.compute_cams)
        cfg = tiny_config(Path(cache))
        barrier.wait()  # both processes meet the empty cache at the same moment
        with warnings.catch_warnings():
            warnings.simplefilter("error", CorruptCacheWarning)  # nothing here may look corrupt
            ctx = pipeline.prepare(cfg, progress=False)
            digest = maps_digest(ctx)
        queue.put({"cached": ctx.backbone.cached, "cams_built": f"cams_{VARIANT}" in ctx.timings_s,
                   "weights": weights_digest(ctx.model), "maps": digest})
    except BaseException as exc:  # reported to the test, which shows it
        queue.put(f"{type(exc).__name__}: {exc}"[:600])


def leftovers(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if ".tmp" in p.name or ".old" in p.name)


@pytest.mark.slow
def test_two_processes_on_an_empty_cache_build_each_entry_once(tmp_path):
    """Without the per-entry lock both workers trained (and both computed the CAMs): the log
    held two 'train' lines; with it one trains, the other waits and loads its checkpoint."""
    cache, log = tmp_path / "cache", tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(cache), str(log), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(r, dict) for r in results), results
    builds = log.read_text().split()[::2]
    assert builds.count("train") == 1, log.read_text()
    assert builds.count("cams") == 3, log.read_text()  # one process, three splits
    assert sorted(r["cached"] for r in results) == [False, True]
    assert sorted(r["cams_built"] for r in results) == [False, True]
    assert results[0]["weights"] == results[1]["weights"]
    assert results[0]["maps"] == results[1]["maps"]
    assert len(list((cache / "backbones").glob("*.pt"))) == 1
    assert leftovers(cache) == []


@pytest.fixture
def built(tmp_path):
    """A cache holding one backbone and one CAM variant, and what they held."""
    from topocam.core.pipeline import prepare

    cache = tmp_path / "cache"
    ctx = prepare(tiny_config(cache), progress=False)
    maps = {s: {k: np.array(v) for k, v in ctx.cams(VARIANT, s).maps.items()} for s in ("train", "val", "test")}
    return cache, ctx, maps


def truncate(path: Path, keep: float) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_a_truncated_checkpoint_is_named_and_retrained(built, keep):
    from topocam.core.pipeline import prepare

    cache, first, _ = built
    (ckpt,) = (cache / "backbones").glob("*.pt")
    truncate(ckpt, keep)
    stale = ckpt.with_name(f".{ckpt.name}.tmp999999")  # as a builder killed before its rename leaves
    stale.write_bytes(b"half")
    with pytest.warns(CorruptCacheWarning, match=ckpt.name):
        again = prepare(tiny_config(cache), progress=False)
    assert not again.backbone.cached
    assert weights_digest(again.model) == weights_digest(first.model)
    assert leftovers(cache) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptCacheWarning)
        third = prepare(tiny_config(cache), progress=False)  # the rebuilt file reads back
    assert third.backbone.cached


def test_a_truncated_cam_file_is_named_and_recomputed(built):
    from topocam.core.pipeline import prepare

    cache, _, maps = built
    (bad,) = cache.glob(f"cams/*/{VARIANT}/train/layer3.npy")
    truncate(bad, 0.5)
    ctx = prepare(tiny_config(cache), progress=False)
    assert ctx.backbone.cached
    with pytest.warns(CorruptCacheWarning, match="layer3.npy"):
        val = ctx.cams(VARIANT, "val")  # any split: the whole variant is checked, then rebuilt
    assert f"cams_{VARIANT}" in ctx.timings_s
    for s in ("train", "val", "test"):
        for k, m in ctx.cams(VARIANT, s).maps.items():
            np.testing.assert_array_equal(m, maps[s][k])
    assert set(val.maps) == set(maps["val"])
    assert leftovers(cache) == []


def test_a_bad_cam_file_met_outside_the_check_is_a_one_line_error(built):
    """``CamStore.load`` names the file in a TopoCAMError (the CLI prints it as one line)."""
    cache, ctx, _ = built
    (bad,) = cache.glob(f"cams/*/{VARIANT}/test/probs.npy")
    truncate(bad, 0.3)
    with pytest.raises(TopoCAMError, match="probs.npy"):
        ctx.store.load(VARIANT, "test")


def test_atomic_path_leaves_old_content_and_no_temporary_on_failure(tmp_path):
    from topocam.core.atomic import atomic_path, temporaries_of

    target = tmp_path / "entry"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "a").write_text("half")
            raise OSError("No space left on device")
    assert (target / "a").read_text() == "old"
    assert temporaries_of(target) == []
    with atomic_path(target) as tmp:  # a folder replaces a folder
        tmp.mkdir()
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new"
    assert temporaries_of(target) == []
