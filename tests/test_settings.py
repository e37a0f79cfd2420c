"""One declaration per setting (topocam.core.settings), and the stages as fitted objects.

The declarations are read back through every surface that is derived from them: the
configuration's validation, ``topocam run --help``, the study-file schema, the search
space and the ablation arm keys. A surface that forgot a setting, or kept a list of its
own, fails here."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import optuna
import pytest
from typer.testing import CliRunner

from topocam.cli import app
from topocam.core.errors import TopoCAMError
from topocam.core.roi import RoiSelector, WholeImage, dice, roi_masks
from topocam.core.settings import SETTINGS, TopoCAMConfig, arm_settings, in_section
from topocam.core.topology import BettiFeatures, BettiGrid
from topocam.search import space
from topocam.search.ablate import load_suite
from topocam.search.studyfile import load_study
from topocam.tracking.figures import roi_quality_rows


def test_each_setting_reaches_every_surface_it_is_declared_for(tmp_path):
    help_text = CliRunner().invoke(app, ["run", "--help"], terminal_width=240).output
    options = set(re.findall(r"--[a-z][a-z0-9-]*", help_text))
    for name, s in SETTINGS.items():
        assert (s.option in options) == s.cli, name  # `topocam run` has an option exactly for the cli settings
        if s.search is not None:
            assert all(p in {**space.DEFAULT_SPACE, **space.OPTIONAL_SPACE} for p in s.params), name
            assert all(space.SETTING_OF[p] == name for p in s.params), name
            assert all(p in space.DEFAULT_SPACE for p in s.params) == s.search.default, name
    assert set(arm_settings()) == {n for n, s in SETTINGS.items() if s.arm}
    # a study file's [fixed] table takes every setting declared for it, under its own name
    fixed = {n: s.default for n, s in in_section("fixed").items() if n not in ("n_jobs",)}
    assert {"tau", "tau_mode", "cam", "weights", "mlp", "head"} <= set(fixed)
    study = tmp_path / "all.toml"
    values = {"tau": 0.45, "tau_mode": "relative", "cam": "gradcampp", "weights": [1.0, 0.0, 2.0], "mlp": [8, 4],
              "head": "hybrid", "bins": 12, "outside": "exclude", "mlp_lr": 0.01, "mlp_weight_decay": 0.001}
    body = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in values.items())
    study.write_text(f'[study]\nname = "all"\n[data]\ndataset = "synthetic2d"\nsize = 16\n[fixed]\n{body}\n')
    base = load_study(study).base
    for k, v in values.items():
        assert getattr(base, k) == (tuple(v) if isinstance(v, list) else v), k


@pytest.mark.parametrize("name, bad", [
    ("tau", 1.5), ("tau", -0.1), ("bins", 1), ("epochs", 0), ("batch_size", 1), ("lr", 0.0), ("seed", -1),
    ("data_seed", -2), ("clutter", 0), ("cam", "xgradcam"), ("tau_mode", "percent"), ("weights", (1.0, 2.0)),
    ("mlp_lr", 0.0), ("mlp_weight_decay", -1.0), ("head", "linear"), ("size", 16.5), ("synthetic_n", (40, 1, 1)),
])
def test_validation_follows_each_declaration(name, bad):
    with pytest.raises(TopoCAMError, match=re.escape(name)):
        dataclasses.replace(TopoCAMConfig(dataset="synthetic2d", size=16), **{name: bad}).validated()


def test_tau_mode_is_searchable_from_its_declaration_alone(tmp_path):
    """tau_mode became searchable by one line in its declaration (search=Search(default=False)):
    a study file adds it with [space.tau_mode]; a trial's value reaches the configuration; it is
    an ROI setting, so Topo-Original's equal-budget space leaves it out."""
    study = tmp_path / "tm.toml"
    study.write_text('[study]\nname = "tm"\n[data]\ndataset = "synthetic2d"\nsize = 16\n'
                     '[space.tau_mode]\nchoices = ["absolute", "relative"]\n')
    spec = load_study(study)
    assert spec.space["tau_mode"].kind == "categorical" and spec.space["tau_mode"].choices == ("absolute", "relative")
    assert "tau_mode" not in space.DEFAULT_SPACE and "tau_mode" not in space.arm_space(spec.space, "topo_original")
    seen = set()
    st = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = st.ask()
        cfg = space.apply_params(spec.base, space.suggest(trial, spec.space))
        seen.add(cfg.validated().tau_mode)
        st.tell(trial, 0.0)
    assert seen == {"absolute", "relative"}
    suite = tmp_path / "s.toml"
    suite.write_text('[[ablation]]\nname = "mode"\narms = [{ arm = "rel", tau_mode = "relative" }]\n')
    assert load_suite(suite).arms[0].settings == {"tau_mode": "relative"}


def test_default_space_keeps_the_order_samplers_draw_in():
    """Samplers draw parameters in the space's order (a seeded random or DE trial depends on it):
    the order studies were run with."""
    assert list(space.DEFAULT_SPACE) == ["w_layer2", "w_layer3", "w_layer4", "tau", "cam", "mlp_h1", "mlp_h2"]


def test_roi_quality_describes_the_roi_of_the_configured_tau_mode():
    """The ROI-quality figure of a relative-tau configuration thresholds each map relative to
    its maximum, as the configuration's ROI does (it used to threshold M >= tau whatever
    the mode, describing another ROI)."""
    rng = np.random.default_rng(0)
    fused = (rng.random((6, 12, 12)) * 0.5).astype(np.float32)  # never reaches an absolute tau of 0.6
    truth = fused >= 0.3
    selector = RoiSelector(tau=0.6, tau_mode="relative")
    rows = roi_quality_rows({"gradcam": fused}, truth, selector, taus=(0.6,))
    (row,) = rows
    relative = roi_masks(fused, 0.6, "relative")
    assert relative.any() and not (fused >= 0.6).any()
    assert row["dice"] == pytest.approx(float(dice(relative, truth).mean()))
    assert row["roi_fraction"] == pytest.approx(float(relative.mean())) and row["tau_mode"] == "relative"
    absolute = roi_quality_rows({"gradcam": fused}, truth, dataclasses.replace(selector, tau_mode="absolute"), taus=(0.6,))
    assert absolute[0]["roi_fraction"] == 0.0


def test_betti_features_learn_the_grid_on_fit_and_refuse_to_transform_unfitted():
    rng = np.random.default_rng(1)
    train = rng.random((9, 10, 10))
    counts = np.full(9, 100)
    unfitted = BettiFeatures(bins=7)
    with pytest.raises(TopoCAMError, match="before fit"):
        unfitted.transform(train, counts)
    chunked = BettiFeatures(bins=7).fit(iter([train[:4], train[4:]]))
    assert np.array_equal(chunked.grid_.thresholds, BettiGrid.fit(train, 7).thresholds)
    other = rng.random((3, 10, 10)) * 5  # another split's range never moves the grid
    assert np.array_equal(chunked.transform(other, np.full(3, 100)),
                          BettiFeatures.fitted(chunked.grid_).transform(other, np.full(3, 100)))


def test_roi_selector_is_the_stage_training_and_inference_share():
    rng = np.random.default_rng(2)
    maps = {name: rng.random((4, 3, 3)).astype(np.float32) for name in ("layer2", "layer3", "layer4")}
    sel = RoiSelector("gradcam", (0.0, 1.0, 1.0), 0.5, "absolute", "exclude")
    fused, masks = sel.from_maps(maps, (12, 12))
    asked = []
    fused2, masks2 = sel.transform(lambda layer: asked.append(layer) or _up(maps[layer]))
    assert asked == ["layer3", "layer4"]  # a layer of weight 0 is never asked for
    assert np.array_equal(fused, fused2) and np.array_equal(masks, masks2)
    seg = sel.segment(np.ones((4, 12, 12)), masks)
    assert np.isinf(seg[~masks]).all() and (seg[masks] == 1).all()
    assert WholeImage("zero").transform(2, (5, 5))[1].all()


def _up(m):
    from topocam.core.roi import upsample_normalised

    return upsample_normalised(m, (12, 12))
