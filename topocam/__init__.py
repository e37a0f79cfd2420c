"""TopoCAM: topological signatures of CAM-selected regions of interest."""

from .errors import TopoCAMError

__all__ = ["TopoCAMError"]
__version__ = "0.1.0"
