"""Write a file so that readers see the old content or the new, never half of it:
write a temporary file beside it, then rename it into place (``os.replace``)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _tmp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_for(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=float) + "\n")
