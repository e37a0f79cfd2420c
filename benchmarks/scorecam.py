"""Score-CAM cost: the per-image loop it replaced vs ``topocam.core.cam.compute_cams``,
side by side in one run, on the ``small`` backbone (random weights, randomised
BatchNorm statistics so the folding is exercised) and random inputs.

    python benchmarks/scorecam.py [--volumes 4] [--images 32] [--repeats 3] [--chunk N]

Per case (3D 28^3 and 2D 28^2): seconds per image of each (the minimum over
repeats, old and new alternating so that load from other jobs hits both), the
ratio, and the largest absolute difference between their maps (all CAM layers).
The old path is the pre-issue-11 code, kept verbatim below as ``old_score_cams``,
with its default of 128 masks per forward pass; the new one uses its default
(``--chunk`` overrides it). Both run with torch's default thread count.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from topocam.core.backbone import CAM_LAYERS, Backbone, build_backbone
from topocam.core.cam import _Activations, _combine, cam_targets, compute_cams, normalise_maps


def _old_score_cam_weights(model: Backbone, x: torch.Tensor, acts: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    n, c = acts.shape[:2]
    up = F.interpolate(acts, size=x.shape[2:], mode="bilinear" if x.ndim == 4 else "trilinear", align_corners=False)
    up = normalise_maps(up.reshape(n * c, *up.shape[2:]).unsqueeze(1)).reshape(n, c, *up.shape[2:])
    scores = torch.empty(n, c, device=x.device)
    for i in range(n):
        for j in range(0, c, chunk):
            masks = up[i, j : j + chunk].unsqueeze(1)  # (m, 1, *spatial)
            logits = model(x[i : i + 1] * masks)
            scores[i, j : j + chunk] = logits[:, targets[i]]
    return torch.softmax(scores, dim=1)


def old_score_cams(model: Backbone, x: np.ndarray, chunk: int = 128) -> dict[str, np.ndarray]:
    """compute_cams(model, x, "scorecam") as it was, for one batch."""
    model.eval()
    hooks = _Activations(model)
    try:
        with torch.no_grad():
            xb = torch.from_numpy(x)
            targets = cam_targets(model(xb))
            acts = {name: hooks.out[name] for name in CAM_LAYERS}
            return {name: _combine(a, _old_score_cam_weights(model, xb, a, targets, chunk)).numpy() for name, a in acts.items()}
    finally:
        hooks.close()


def small_model(ndim: int, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    model, _ = build_backbone("small", ndim, 2, 28)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def run_case(ndim: int, n: int, repeats: int, chunk: int | None) -> dict:
    model = small_model(ndim)
    x = np.random.default_rng(0).random((n, 1) + (28,) * ndim, dtype=np.float32)
    old_t, new_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        old = old_score_cams(model, x)
        old_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        new = compute_cams(model, x, "scorecam", batch_size=n, score_chunk=chunk).maps
        new_t.append(time.perf_counter() - t0)
    diff = max(float(np.abs(old[k] - new[k]).max()) for k in CAM_LAYERS)
    return {"old": min(old_t) / n, "new": min(new_t) / n, "diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=4, help="3D images (28^3)")
    ap.add_argument("--images", type=int, default=32, help="2D images (28^2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=None, help="score_chunk of the new path (default: its own)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, new path's chunk {args.chunk or 'default'}")
    print(f"{'case':<12}{'old s/img':>11}{'new s/img':>11}{'ratio':>8}{'max |diff|':>12}")
    for ndim, n in ((3, args.volumes), (2, args.images)):
        if n == 0:  # --volumes 0 or --images 0 skips the case
            continue
        r = run_case(ndim, n, args.repeats, args.chunk)
        print(f"{f'{ndim}D 28px x{n}':<12}{r['old']:>11.4f}{r['new']:>11.4f}{r['old'] / r['new']:>8.2f}{r['diff']:>12.2e}", flush=True)
        assert r["diff"] < 1e-4, f"{ndim}D maps differ by {r['diff']:.2e}"


if __name__ == "__main__":
    main()
