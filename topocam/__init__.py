"""TopoCAM: topological signatures of CAM-selected regions of interest."""

from .core.errors import TopoCAMError

__all__ = ["TopoCAMError"]
try:  # one source of truth: the version in pyproject.toml, as installed
    from importlib.metadata import version as _version

    __version__ = _version("topocam")
except Exception:  # not installed (a bare checkout on sys.path)
    __version__ = "0+unknown"
