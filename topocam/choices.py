"""The names a user can choose, declared once in a module that imports nothing
heavy (no torch, no Optuna), so the CLI can show them in ``--help`` and check
them at parse time, and the library modules check the same tuples."""

from __future__ import annotations

from enum import Enum

CAM_VARIANTS: tuple[str, ...] = ("gradcam", "gradcampp", "scorecam")
OUTSIDE_MODES: tuple[str, ...] = ("zero", "exclude")
BETTI_BACKENDS: tuple[str, ...] = ("fast", "giotto")
BACKBONES: tuple[str, ...] = ("auto", "resnet18", "r3d18", "small")
PRESETS: tuple[str, ...] = ("medmnist_v2",)
SAMPLERS: tuple[str, ...] = ("de", "de_immediate", "tpe", "cmaes", "random", "gp")
ARMS: tuple[str, ...] = ("topocam", "topo_original")  # the tunable methods


def choice_enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A ``str`` Enum of ``values`` (member name = value), for Typer options."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


CamChoice = choice_enum("CamChoice", CAM_VARIANTS)
OutsideChoice = choice_enum("OutsideChoice", OUTSIDE_MODES)
BettiBackendChoice = choice_enum("BettiBackendChoice", BETTI_BACKENDS)
BackboneChoice = choice_enum("BackboneChoice", BACKBONES)
PresetChoice = choice_enum("PresetChoice", PRESETS)
SamplerChoice = choice_enum("SamplerChoice", SAMPLERS)
ArmChoice = choice_enum("ArmChoice", ARMS)
