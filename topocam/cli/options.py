"""Command-line options derived from the settings' declarations (``topocam.core.settings``):
one option per setting, with the setting's name, help, default, choices and type, so a
new setting needs no edit here. Tuples are comma-separated (``--weights 0.2,0.3,0.5``)."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from topocam.core.choices import choice_enum
from topocam.core.settings import Setting


def _annotation(s: Setting) -> Any:
    if s.choices:
        return choice_enum(f"{s.name.title().replace('_', '')}Choice", tuple(s.choices))
    if s.is_tuple:
        return str
    if s.default is None:
        return Optional[Path] if s.name.endswith("_dir") else Optional[str]
    return s.type


def _default_text(s: Setting) -> str:
    if s.is_tuple:
        return ",".join(map(str, s.default)) or "none"
    return str(s.default)


def _option(s: Setting, callbacks: dict[str, Callable]) -> inspect.Parameter:
    if s.recipe:  # a --preset sets it unless it is given
        default, help_text = None, f"{s.help} [default: {_default_text(s)}, or the preset's]"
        annotation: Any = Optional[str] if s.is_tuple else Optional[s.type]
    else:
        default = ",".join(map(str, s.default)) if s.is_tuple else s.default
        help_text, annotation = s.help, _annotation(s)
    option = typer.Option(default, s.option, help=help_text, callback=callbacks.get(s.name),
                          show_default=not s.recipe and s.default is not None)
    return inspect.Parameter(s.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option, annotation=annotation)


def parse(s: Setting, raw: Any) -> Any:
    """A setting's value from its option (an Enum's value, a comma-separated tuple, a path
    as text); ``ValueError`` names the option where a tuple's items are not numbers."""
    if raw is None:
        return None
    if hasattr(raw, "value"):
        return raw.value
    if s.is_tuple:
        try:
            return tuple(s.type(v) for v in str(raw).split(",") if v.strip())
        except ValueError:
            kind = "integers" if s.type is int else "numbers"
            raise ValueError(f"{s.option} must be comma-separated {kind}, got {raw!r}") from None
    if isinstance(raw, Path):
        return str(raw)
    return raw


def with_setting_options(settings: dict[str, Setting], callbacks: dict[str, Callable] | None = None):
    """Give a Typer command one option per setting in ``settings`` (before its own
    parameters). The command receives them as ``settings``: name -> the raw option
    value, for :func:`parse`."""

    def decorate(command: Callable) -> Callable:
        own = inspect.signature(command)
        params = [p for p in own.parameters.values() if p.name != "settings"]
        added = [_option(s, callbacks or {}) for s in settings.values()]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in settings}
            return command(**kwargs, settings=given)

        # the settings first (in their declaration order, by stage), then the command's own options
        wrapper.__signature__ = own.replace(parameters=added + params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {**{p.name: p.annotation for p in params}, **{p.name: p.annotation for p in added}}
        return wrapper

    return decorate
