"""One conversion of results to JSON data (``topocam.core.atomic.json_safe``), used by every
JSON file the project writes: strict JSON (NaN and infinities as null), numpy as Python."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from topocam.core.atomic import json_safe, write_json_atomic


def test_json_safe_gives_plain_strict_json_data():
    obj = {"auc": np.float32(0.5), "n": np.int64(3), "ok": np.bool_(True), "nan": float("nan"), "inf": -math.inf,
           "arr": np.array([[1.0, np.nan], [2.0, 3.0]]), "t": (1, np.float64(2.5)), "p": Path("/a/b"),
           np.int64(7): "key", 0.5: "float key", "none": None, "s": "x"}
    out = json_safe(obj)
    assert out == {"auc": 0.5, "n": 3, "ok": True, "nan": None, "inf": None, "arr": [[1.0, None], [2.0, 3.0]],
                   "t": [1, 2.5], "p": "/a/b", 7: "key", 0.5: "float key", "none": None, "s": "x"}
    assert type(out["n"]) is int and type(out["auc"]) is float and type(out["ok"]) is bool
    json.dumps(out, allow_nan=False)  # strict
    with pytest.raises(TypeError):  # what is not data stays refused
        json.dumps(json_safe({"f": object()}))


def test_write_json_atomic_writes_strict_json(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"auc": float("nan"), "counts": np.array([3, 4])})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and json.loads(text) == {"auc": None, "counts": [3, 4]}
