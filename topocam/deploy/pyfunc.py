"""The MLflow ``python_function`` model over a TopoCAM bundle.

``predict`` takes a batch of images (see ``inputs.py``) and returns, per
image, ``{"class", "probabilities", "roi_fraction"}``. Bad input raises an
``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which ``mlflow models
serve`` answers with HTTP 400 and the message.

``explain`` (reached through ``PyFuncModel.unwrap_python_model()``) also gives
the prepared images, fused CAMs and ROI masks, for overlays and the web page.

The model is logged from code (``model_code.py``); its one artifact,
``bundle``, is the folder ``bundle.py`` writes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np

from ..core.errors import TopoCAMError
from ..core.pipeline import ImagePredictions
from .bundle import Bundle
from .inputs import as_batch

BUNDLE_ARTIFACT = "bundle"


@dataclass
class Explanation:
    x: np.ndarray  # (n, C, *shape) float32 in [0, 1]: what the backbone saw
    gray: np.ndarray  # (n, *shape): what the topology saw (and what overlays show)
    out: ImagePredictions

    def records(self) -> list[dict[str, Any]]:
        return [
            {"class": int(np.argmax(p)), "probabilities": [float(v) for v in p], "roi_fraction": float(f)}
            for p, f in zip(self.out.probs, self.out.roi_fraction)
        ]


class TopoCAMModel(mlflow.pyfunc.PythonModel):
    """MedMNIST-layout images in, class + probabilities + ROI fraction out."""

    def __init__(self, bundle: Bundle | None = None):
        self.bundle = bundle
        self._lock = threading.Lock()  # CAM hooks live on the backbone: one batch at a time

    def load_context(self, context) -> None:
        self.bundle = Bundle.load(context.artifacts[BUNDLE_ARTIFACT])

    @property
    def info(self) -> dict[str, Any]:
        """``topocam.json`` of the bundle: input, classes, settings, provenance."""
        return self.bundle.describe()

    def explain(self, images) -> Explanation:
        """Validate and convert ``images``, then run the chain. Raises TopoCAMError on bad input."""
        x = as_batch(images, self.bundle.input)
        with self._lock:
            out = self.bundle.predict(x)
        gray = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1)
        return Explanation(x, gray, out)

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        try:
            return self.explain(model_input).records()
        except TopoCAMError as exc:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(f"TopoCAM input error: {exc}", error_code=INVALID_PARAMETER_VALUE) from None
