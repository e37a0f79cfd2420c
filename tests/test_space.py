"""Unit tests of topocam.search.space: parsing [space.*] tables, the arms'
spaces and the mapping of parameters onto a TopoCAMConfig."""

import optuna
import pytest

from topocam.core.errors import TopoCAMError
from topocam.core.pipeline import TopoCAMConfig
from topocam.search.space import (
    DEFAULT_SPACE, ROI_PARAMS, WEIGHT_PARAMS, Param, apply_params, arm_space, build_space, parse_param, suggest,
)

W = "s.toml"


def test_topo_original_space_has_no_roi_parameters_but_the_same_mlp_search():
    space = build_space({"bins": {"low": 20, "high": 40}}, W)
    topo = arm_space(space, "topo_original")
    assert set(topo) == set(space) - set(ROI_PARAMS) == {"mlp_h1", "mlp_h2", "bins"}
    assert all(topo[k] is space[k] for k in topo)  # the same ranges, not copies that could drift
    assert arm_space(space, "topocam") == space and arm_space(space, "topocam") is not space


def test_narrowed_fixed_and_optional_parameters():
    space = build_space({"tau": {"low": 0.4, "high": 0.5}, "cam": {"choices": ["gradcampp", "gradcampp"]},
                         "w_layer2": {"fixed": 0}, "outside": {"fixed": "exclude"}}, W)
    assert (space["tau"].low, space["tau"].high) == (0.4, 0.5)
    assert space["cam"].choices == ("gradcampp",)  # duplicates dropped
    assert space["w_layer2"] == Param("w_layer2", "fixed", value=0) and space["outside"].value == "exclude"
    assert space["mlp_h1"] == DEFAULT_SPACE["mlp_h1"]


@pytest.mark.parametrize("name, spec, words", [
    ("nope", {"low": 0}, ["[space.nope]", "known: w_layer2"]),
    ("tau", {"low": 0.5, "high": 0.5}, ["[space.tau] is an empty range", "low 0.5 must be below high 0.5"]),
    ("tau", {"low": -0.1}, ["[space.tau] low = -0.1 is outside [0.0, 1.0]"]),
    ("tau", {"fixed": 0.5, "low": 0.1}, ["'fixed' and a range"]),
    ("mlp_h1", {"low": 8.5}, ["[space.mlp_h1] low must be an integer, got 8.5"]),
    ("mlp_h1", {"low": True}, ["must be an integer, got True"]),
    ("mlp_lr", {"low": 0.0, "high": 0.1, "log": True}, ["outside"]),
    ("mlp_weight_decay", {"low": 0.0, "high": 0.1, "log": True}, ["log range needs low > 0, got 0.0"]),
    ("cam", {"choices": ["xgradcam"]}, ["[space.cam] choices ['xgradcam'] not among"]),
    ("cam", {"choices": []}, ["non-empty list"]),
    ("cam", {"fixed": "xgradcam"}, ["fixed = 'xgradcam' is not one of"]),
    ("cam", {"low": 1}, ["unknown key(s) ['low'] in [space.cam]"]),
    ("tau", "0.5", ["[space.tau] must be a table"]),
])
def test_bad_tables_name_the_parameter_and_the_file(name, spec, words):
    with pytest.raises(TopoCAMError) as err:
        parse_param(name, spec, W)
    msg = str(err.value)
    assert msg.startswith(f"{W}: ")
    for w in words:
        assert w in msg, msg


def test_all_weights_fixed_at_zero_is_refused():
    with pytest.raises(TopoCAMError, match="all three fusion weights are fixed at 0"):
        build_space({w: {"fixed": 0} for w in WEIGHT_PARAMS}, W)
    build_space({"w_layer2": {"fixed": 0}, "w_layer3": {"fixed": 0}, "w_layer4": {"fixed": 0.5}}, W)


def test_suggest_stays_in_the_ranges_and_apply_builds_a_valid_config():
    space = build_space({"tau": {"low": 0.4, "high": 0.45}, "w_layer4": {"fixed": 0.0}, "bins": {"low": 10, "high": 12}}, W)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        p = suggest(trial, space)
        assert 0.4 <= p["tau"] <= 0.45 and p["w_layer4"] == 0.0 and 10 <= p["bins"] <= 12
        assert 16 <= p["mlp_h1"] <= 256 and isinstance(p["mlp_h1"], int)
        cfg = apply_params(TopoCAMConfig(), p).validated()
        assert cfg.mlp == (p["mlp_h1"], p["mlp_h2"]) and cfg.tau == p["tau"] and cfg.bins == p["bins"]
        assert cfg.weights == (p["w_layer2"], p["w_layer3"], 0.0) or sum(cfg.weights) == 3.0
        study.tell(trial, 0.5)


def test_apply_params_edge_cases():
    base = TopoCAMConfig(weights=(0.2, 0.3, 0.5), tau=0.6, cam="gradcam")
    zero = apply_params(base, {"mlp_h1": 8, "mlp_h2": 4, "w_layer2": 0.0, "w_layer3": 0.0, "w_layer4": 0.0})
    assert zero.weights == (1.0, 1.0, 1.0)  # all-zero raw weights: equal weights, a defined point
    topo = apply_params(base, {"mlp_h1": 8, "mlp_h2": 4})  # Topo-Original: the base's ROI settings stay
    assert (topo.weights, topo.tau, topo.cam, topo.mlp) == ((0.2, 0.3, 0.5), 0.6, "gradcam", (8, 4))
    assert base.mlp != (8, 4)  # the base is not changed
