"""The one place that seeds every random number generator we use."""

import os
import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    import torch

    torch.manual_seed(seed)


def reproducibility(device: str = "auto") -> dict[str, object]:
    """What a result's bits depend on besides the seed, recorded with it (metrics.json, MLflow
    params): the torch and CUDA versions, the device, torch's thread count and whether
    deterministic algorithms were asked for. ``device``: the configuration's ``device`` setting,
    recorded as the device it resolves to here. Same values (and the same data and model
    artifacts): the same numbers, bit for bit; otherwise equal only within a tolerance."""
    import torch

    from .backbone import resolve_device

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "device": str(resolve_device(device)),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
