"""Names a user can choose that have no table of their own, declared once in a
module that imports nothing heavy (no torch, no Optuna), so the CLI can show
them in ``--help`` and check them at parse time, and the library modules check
the same tuples; and :func:`choice_enum`, which makes a Typer option's Enum.

Names that are the keys of the table that builds them are declared there, not
here: the CAM variants (``topocam.core.cam.CAMS``), the training presets
(``topocam.core.backbone.PRESETS``) and the samplers
(``topocam.search.samplers.SAMPLER_TABLE``)."""

from __future__ import annotations

from enum import Enum

OUTSIDE_MODES: tuple[str, ...] = ("zero", "exclude")
BETTI_BACKENDS: tuple[str, ...] = ("fast", "giotto")
BACKBONES: tuple[str, ...] = ("auto", "resnet18", "r3d18", "small")
ARMS: tuple[str, ...] = ("topocam", "topo_original")  # the tunable methods


def choice_enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A ``str`` Enum of ``values`` (member name = value), for Typer options."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


OutsideChoice = choice_enum("OutsideChoice", OUTSIDE_MODES)
BettiBackendChoice = choice_enum("BettiBackendChoice", BETTI_BACKENDS)
BackboneChoice = choice_enum("BackboneChoice", BACKBONES)
ArmChoice = choice_enum("ArmChoice", ARMS)


def check_sampler_seed(seed) -> int:
    """A sampler seed: an integer >= 0 (as a study file's ``[study] seeds``), or a TopoCAMError."""
    from .errors import TopoCAMError

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TopoCAMError(f"a sampler seed is an integer >= 0 (as in a study file's [study] seeds), got {seed!r}")
    return seed


def check_n_trials(n_trials, what: str = "n_trials") -> int:
    """A trial budget: an integer >= 1, or a TopoCAMError naming ``what``."""
    from .errors import TopoCAMError

    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise TopoCAMError(f"{what} (the trial budget) must be an integer >= 1, got {n_trials!r}")
    return n_trials
