"""The fitted TopoCAM chain on disk: everything an exported model needs, and nothing else.

A bundle folder holds

    topocam.json   configuration, input spec, classes, CAM variant and layers, fusion
                   weights, tau, outside mode, Betti grid, MLP sizes, provenance
    backbone.pt    the fine-tuned backbone's weights (state dict) and architecture
    mlp.pt         the MLP (torch module)
    arrays.npz     the Betti grid thresholds and the feature scaler (mean, scale),
                   bit-exact

:meth:`Bundle.predict` runs ``pipeline.predict_images``, the pipeline's own
chain, so a bundle reproduces the probabilities the pipeline computed when
it was exported. No MLflow here: ``pyfunc.py`` wraps a bundle for MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.atomic import json_safe
from ..core.backbone import CAM_LAYERS, DEVICE_ENV, Backbone, build_backbone, resolve_device
from ..core.classifier import TopoMLP
from ..core.errors import TopoCAMError
from ..core.pipeline import ImagePredictions, TopoCAMConfig, predict_images
from ..core.roi import fusion_weights
from ..core.topology import BettiGrid
from .inputs import InputSpec

FORMAT = 1
FILES = ("topocam.json", "backbone.pt", "mlp.pt", "arrays.npz")


def config_from_dict(d: dict[str, Any]) -> TopoCAMConfig:
    """A TopoCAMConfig from its ``as_dict()`` (lists back to tuples; unknown keys ignored)."""
    names = {f.name for f in dataclasses.fields(TopoCAMConfig)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    return TopoCAMConfig(**kw)


@dataclass
class Bundle:
    backbone: Backbone
    config: TopoCAMConfig
    grid: BettiGrid
    mlp: TopoMLP
    input: InputSpec
    class_names: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] | None = None  # an imported dataset's core.scans.Preprocessing; None: deploy/files.py's rules

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def predict(self, x: np.ndarray) -> ImagePredictions:
        """``x``: (n, C, *shape) float32 in [0, 1] (``inputs.as_batch``)."""
        return predict_images(self.backbone, self.config, self.grid, self.mlp, x, n_jobs=1)

    def describe(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-able data (``topocam.json``)."""
        cfg = self.config
        return {
            "format": FORMAT,
            "input": self.input.as_dict(),
            "classes": self.class_names,
            "backbone": {"arch": self.backbone.arch, "ndim": self.input.ndim},
            "cam": {"variant": cfg.cam, "layers": list(CAM_LAYERS), "target": "predicted",
                    "weights_raw": list(cfg.weights), "weights": [float(w) for w in fusion_weights(cfg.weights)]},
            "tau": cfg.tau,
            "outside": cfg.outside,
            "betti": {"bins": int(self.grid.n_bins), "backend": cfg.betti_backend,
                      "grid": [float(t) for t in self.grid.thresholds], "fitted_on": "train"},
            "mlp": {"hidden": [int(h) for h in cfg.mlp], "best_epoch": int(self.mlp.best_epoch),
                    "n_features": int(self.mlp.mean.shape[0])},
            "config": {**cfg.as_dict(), "cache_dir": None},
            "provenance": self.provenance,
            **({"preprocessing": self.preprocessing} if self.preprocessing else {}),
        }

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "topocam.json").write_text(json.dumps(json_safe(self.describe()), indent=2, allow_nan=False) + "\n")
        state = {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}
        torch.save({"arch": self.backbone.arch, "ndim": self.input.ndim, "n_classes": self.n_classes,
                    "input_size": min(self.input.shape), "state_dict": state}, folder / "backbone.pt")
        torch.save(self.mlp.net.cpu(), folder / "mlp.pt")
        np.savez(folder / "arrays.npz", thresholds=self.grid.thresholds, mean=self.mlp.mean, scale=self.mlp.scale)
        return folder

    @classmethod
    def load(cls, folder: Path, device: str | None = None) -> "Bundle":
        """The bundle in ``folder``, its backbone on ``device`` (default: ``$TOPOCAM_DEVICE``, else auto);
        the MLP stays on the CPU (a few thousand weights)."""
        folder = Path(folder)
        where = resolve_device(device or os.environ.get(DEVICE_ENV, "") or "auto")
        missing = [f for f in FILES if not (folder / f).is_file()]
        if missing:
            raise TopoCAMError(f"{folder} is not a TopoCAM model bundle (missing {', '.join(missing)})")
        meta = json.loads((folder / "topocam.json").read_text())
        if meta.get("format") != FORMAT:
            raise TopoCAMError(f"{folder}: bundle format {meta.get('format')!r}; this TopoCAM reads format {FORMAT}")
        blob = torch.load(folder / "backbone.pt", map_location="cpu", weights_only=True)
        backbone, _ = build_backbone(blob["arch"], blob["ndim"], blob["n_classes"], blob["input_size"])
        backbone.load_state_dict(blob["state_dict"])
        backbone.to(where).eval()
        net = torch.load(folder / "mlp.pt", map_location="cpu", weights_only=False)  # our own nn.Sequential
        net.eval()
        with np.load(folder / "arrays.npz", allow_pickle=False) as z:
            thresholds, mean, scale = z["thresholds"], z["mean"], z["scale"]
        mlp = TopoMLP(mean=mean, scale=scale, net=net, best_epoch=int(meta["mlp"]["best_epoch"]))
        return cls(backbone, config_from_dict(meta["config"]), BettiGrid(thresholds), mlp,
                   InputSpec.from_dict(meta["input"]), list(meta["classes"]), meta.get("provenance", {}),
                   meta.get("preprocessing"))
