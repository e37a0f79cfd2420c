"""Names declared where they are built: the CAM variants, the training presets and
the samplers are the keys of their tables (topocam.core.cam.CAMS,
topocam.core.backbone.PRESETS, topocam.search.samplers.SAMPLER_TABLE), and the
CLI's choices and the search space follow from them with no second list."""

import pytest
from typer.testing import CliRunner

from topocam.cli import app
from topocam.core.backbone import PRESETS, PresetChoice, training_recipe
from topocam.core.cam import CAMS
from topocam.core.errors import TopoCAMError
from topocam.search.samplers import SAMPLER_TABLE
from topocam.search.space import CHOICES, DEFAULT_SPACE


def test_preset_names_are_the_table_keys():
    assert [c.value for c in PresetChoice] == list(PRESETS) == ["medmnist_v2"]
    for name, recipe in PRESETS.items():
        assert training_recipe(name) == {**recipe, "milestones": tuple(recipe["milestones"])}
    with pytest.raises(TopoCAMError, match="unknown training preset 'imagenet'; choose one of medmnist_v2"):
        training_recipe("imagenet")


def test_a_new_preset_is_a_new_row(monkeypatch):
    monkeypatch.setitem(PRESETS, "toy", {"epochs": 2, "batch_size": 8, "lr": 0.01, "milestones": [1]})
    assert training_recipe("toy", lr=0.1) == {"epochs": 2, "batch_size": 8, "lr": 0.1, "milestones": (1,)}


def test_the_cli_and_the_space_offer_the_tables_names():
    runner = CliRunner()
    run = runner.invoke(app, ["run", "--help"], terminal_width=200).output
    assert "|".join(CAMS) in run and "|".join(PRESETS) in run
    study = runner.invoke(app, ["study", "run", "--help"], terminal_width=200).output
    assert "|".join(SAMPLER_TABLE) in study
    assert CHOICES["cam"] == tuple(CAMS)  # a study may search every row
    assert DEFAULT_SPACE["cam"].choices == tuple(n for n, row in CAMS.items() if row.searched)
