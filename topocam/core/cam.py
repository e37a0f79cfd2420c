"""Class activation maps for layer2, layer3 and layer4 in one pass (A_{w,tau}'s input).

One base computation (:func:`compute_cams`); the variants differ only in how
channel weights are computed, as in pytorch-grad-cam. :data:`CAMS` is the one
declaration of the variants: each row gives its weights function and whether it
takes gradients or needs the scoring network, and the names (``CAM_VARIANTS``,
the CLI's ``--cam``, the search space's ``cam``) are its keys. Adding a variant
is adding a row.

* ``gradcam``:   w_k = mean of dS/dA_k over space;
* ``gradcampp``: Grad-CAM++ (Chattopadhyay et al.) second/third-order weights;
* ``scorecam``:  w = softmax over channels of the target score of X * up(A_k)
  (each activation upsampled to the input and min-max normalised); the masked
  inputs of all images and channels batched through a BatchNorm-folded copy;
* ``layercam``:  LayerCAM (Jiang et al., 2021): per-position weights
  ReLU(dS/dA_k(p)), the map sum_k ReLU(dS/dA_k) * A_k;
* ``eigencam``:  EigenCAM (Muhammad & Yeasin, 2020): gradient-free and
  class-agnostic, the projection of the centred activations (positions x
  channels) on their first principal component, its sign chosen so that it
  grows with the summed activation (SVD leaves the sign arbitrary).

``gradcam``, ``gradcampp`` and ``scorecam`` (the paper's) are a study's default
``cam`` choices; the two others are searched where a study file lists them.

The CAM target class is owned by :func:`cam_targets`: the backbone's
*predicted* class for every split. The true label is only used by the
explicitly named leakage-audit rule ``"label"``.

Each map is ReLU'd and min-max normalised to [0, 1] per image at its native
(low) resolution; upsampling happens only when maps are fused (roi.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import CAM_LAYERS, Backbone, to_device
from .choices import choice_enum
from .data import images_in
from .errors import TopoCAMError

TARGET_RULES: tuple[str, ...] = ("predicted", "label")  # "label" = leakage audit only
SCORE_CHUNK_PIXELS = 1 << 22  # Score-CAM's default forward pass: masked inputs holding about 4M pixels/voxels,
SCORE_CHUNK_MAX = 1024  # at most this many (memory: 1,024 resnet18 stems at 28^2 are 205 MB)


def cam_targets(logits: torch.Tensor, labels: torch.Tensor | None = None, rule: str = "predicted") -> torch.Tensor:
    """THE CAM target rule: the predicted class. ``rule="label"`` exists only
    for the leakage-audit ablation and must be asked for by name."""
    if rule == "predicted":
        return logits.argmax(dim=1)
    if rule == "label":
        if labels is None:
            raise TopoCAMError("the label-targeted (leakage audit) CAM rule needs labels")
        return labels
    raise TopoCAMError(f"unknown CAM target rule {rule!r}; choose one of {', '.join(TARGET_RULES)}")


def normalise_maps(cam: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Per-image min-max to [0, 1] (over every axis but the first); a constant
    map becomes all zeros. ``inplace=True`` overwrites a contiguous ``cam``
    instead of allocating a copy (the CAMs here and roi.upsample_normalised)."""
    flat = cam.reshape(cam.shape[0], -1)
    if not inplace:
        flat = flat.clone()
    lo, hi = torch.aminmax(flat, dim=1, keepdim=True)
    span = hi - lo
    # = where(span > 0, (flat - lo) / span.clamp_min(1e-12), 0), in place, same bits
    flat.sub_(lo).div_(span.clamp_min(1e-12))
    flat[~(span > 0).reshape(-1)] = 0.0
    return flat.reshape(cam.shape)


def _spatial_dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.ndim))


@dataclass(frozen=True)
class LayerInputs:
    """What a weights function may read, for one CAM layer of one batch."""

    acts: torch.Tensor  # (n, c, *layer_shape) the layer's activations A, detached
    grads: torch.Tensor | None  # dS/dA, same shape; None unless the variant uses gradients
    x: torch.Tensor  # (n, 1, *input_shape) the input batch
    targets: torch.Tensor  # (n,) the class each map explains
    scorer: Callable[[torch.Tensor], torch.Tensor] | None  # the scoring network; None unless the variant needs it
    chunk: int  # masked inputs per forward pass of the scorer


def _gradcam_weights(inp: LayerInputs) -> torch.Tensor:
    return inp.grads.mean(dim=_spatial_dims(inp.grads))


def _gradcampp_weights(inp: LayerInputs) -> torch.Tensor:
    acts, grads = inp.acts, inp.grads
    dims = _spatial_dims(grads)
    g2 = grads.pow(2)
    g3 = g2 * grads
    sum_acts = acts.sum(dim=dims, keepdim=True)
    alpha = g2 / (2 * g2 + sum_acts * g3 + 1e-7)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return (alpha * grads.clamp_min(0)).sum(dim=dims)


def _layercam_weights(inp: LayerInputs) -> torch.Tensor:
    """Per-position weights ReLU(dS/dA_k(p)), shaped like the activations."""
    return inp.grads.clamp_min(0)


def _eigencam_projection(inp: LayerInputs) -> torch.Tensor:
    """(n, *layer_shape): each image's centred activations, positions x channels,
    projected on their first right singular vector (pytorch-grad-cam's
    ``get_2d_projection``). The sign is fixed so that the projection correlates
    non-negatively with sum_k A_k: without it, ReLU would keep an arbitrary half."""
    acts = inp.acts.double()  # float64: the SVD's leading vector is stable across batchings
    n, c = acts.shape[:2]
    flat = acts.reshape(n, c, -1).transpose(1, 2)  # (n, positions, c)
    centred = flat - flat.mean(dim=1, keepdim=True)
    v = torch.linalg.svd(centred, full_matrices=False).Vh[:, 0, :]  # (n, c)
    proj = (centred @ v[:, :, None])[..., 0]  # (n, positions)
    total = flat.sum(dim=2)
    sign = torch.where(((proj * (total - total.mean(dim=1, keepdim=True))).sum(dim=1) < 0), -1.0, 1.0)
    return (proj * sign[:, None]).reshape(n, *acts.shape[2:]).to(inp.acts.dtype)


def _combine(acts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k w_k A_k), normalised to [0, 1]; ``weights`` are (n, c) channel
    weights or (n, c, *layer_shape) per-position weights."""
    if weights.ndim != acts.ndim:
        weights = weights.reshape(weights.shape + (1,) * (acts.ndim - 2))
    return normalise_maps(F.relu((weights * acts).sum(dim=1)))


@dataclass
class CamBatch:
    maps: dict[str, np.ndarray]  # layer -> (n, *layer_shape) float32 in [0, 1]
    targets: np.ndarray  # (n,) class each map explains
    probs: np.ndarray  # (n, n_classes) backbone softmax


class _Activations:
    """Forward hooks that keep the CAM layers' outputs of the last forward.

    ``graph_from_first``: the first CAM layer's output becomes a leaf that requires
    grad, so that (with the parameters frozen, :func:`_frozen`) autograd records
    nothing before it: Grad-CAM needs gradients with respect to the CAM layers'
    outputs only, and the stem and layer1, at full resolution, held most of a
    batch's graph (about 4 GB for 64 volumes of 64^3). The maps are the same bits."""

    def __init__(self, model: Backbone, graph_from_first: bool = False):
        self.out: dict[str, torch.Tensor] = {}
        first = CAM_LAYERS[0]

        def keep(name: str, out: torch.Tensor) -> torch.Tensor:
            if graph_from_first and name == first:
                out = out.detach().requires_grad_()
            self.out[name] = out
            return out

        self.handles = [
            layer.register_forward_hook(lambda mod, inp, out, name=name: keep(name, out))
            for name, layer in model.cam_layers().items()
        ]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside (restored after): CAMs need no weight gradients."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _scoring_net(model: Backbone) -> Callable[[torch.Tensor], torch.Tensor]:
    """The backbone for Score-CAM's masked forward passes, made cheaper without
    changing what it computes (the model is in eval mode): BatchNorm folded into
    the preceding convolution (``torch.fx`` fuse), channels-last memory format
    (oneDNN's fast path for convolutions on a CPU), grayscale replicated to 3
    channels once. Outputs equal the model's to float rounding (~1e-7)."""
    from torch.fx.experimental.optimization import fuse

    net = fuse(model.net)  # a fused copy; ``model`` and its hooks are untouched
    weights_ndim = max(p.ndim for p in net.parameters())  # 4: 2D convolutions, 5: 3D
    memory_format = torch.channels_last if weights_ndim == 4 else torch.channels_last_3d
    net = net.to(memory_format=memory_format)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return net(x.expand(-1, 3, *x.shape[2:]).contiguous(memory_format=memory_format))

    return forward


@torch.inference_mode()
def _score_cam_weights(inp: LayerInputs) -> torch.Tensor:
    """Score-CAM weights, softmax_k f(x_i * up(A_ik))[t_i]. Every (image, channel)
    pair is one masked input; they are batched across images and channels,
    ``inp.chunk`` at a time, and each chunk's masks are upsampled and normalised on
    the fly (the n*c full-resolution masks are never held at once)."""
    x, acts, targets, chunk = inp.x, inp.acts, inp.targets, inp.chunk
    n, c = acts.shape[:2]
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    flat = acts.reshape(n * c, 1, *acts.shape[2:])
    image = torch.arange(n, device=x.device).repeat_interleave(c)
    scores = torch.empty(n * c, device=x.device)
    for j in range(0, n * c, chunk):
        masks = normalise_maps(F.interpolate(flat[j : j + chunk], size=x.shape[2:], mode=mode, align_corners=False))
        rows = image[j : j + chunk]
        scores[j : j + chunk] = inp.scorer(x[rows] * masks).gather(1, targets[rows, None])[:, 0]
    return torch.softmax(scores.reshape(n, c), dim=1)


@dataclass(frozen=True)
class CamVariant:
    """One CAM variant: how its channel weights are computed, and what that needs.

    ``uses_gradients``: dS/dA of every CAM layer are taken (one backward pass per
    batch, the graph starting at the first CAM layer) and passed as ``grads``.
    ``needs_scorer``: the BatchNorm-folded scoring network (:func:`_scoring_net`)
    is built once per call and passed as ``scorer``. ``projection``, where given,
    replaces the weighted sum: the map before ReLU, (n, *layer_shape) (EigenCAM).
    ``searched``: among a study's default ``cam`` choices."""

    weights: Callable[[LayerInputs], torch.Tensor] | None  # -> (n, c) channel weights w_k, or per-position weights
    uses_gradients: bool
    needs_scorer: bool = False
    about: str = ""
    projection: Callable[[LayerInputs], torch.Tensor] | None = None
    searched: bool = True


# THE CAM variants (their order is the CLI's and the search space's).
CAMS: dict[str, CamVariant] = {
    "gradcam": CamVariant(_gradcam_weights, uses_gradients=True, about="Grad-CAM (Selvaraju et al.)"),
    "gradcampp": CamVariant(_gradcampp_weights, uses_gradients=True, about="Grad-CAM++ (Chattopadhyay et al.)"),
    "scorecam": CamVariant(_score_cam_weights, uses_gradients=False, needs_scorer=True, about="Score-CAM (Wang et al.)"),
    "layercam": CamVariant(_layercam_weights, uses_gradients=True, about="LayerCAM (Jiang et al.)", searched=False),
    "eigencam": CamVariant(None, uses_gradients=False, projection=_eigencam_projection,
                           about="EigenCAM (Muhammad & Yeasin)", searched=False),
}
CAM_VARIANTS: tuple[str, ...] = tuple(CAMS)
SEARCHED_CAMS: tuple[str, ...] = tuple(name for name, row in CAMS.items() if row.searched)  # a study's default choices
CamChoice = choice_enum("CamChoice", CAM_VARIANTS)  # the CLI's --cam


def check_variant(variant: str) -> None:
    if variant not in CAMS:
        raise TopoCAMError(f"unknown CAM variant {variant!r}; choose one of {', '.join(CAMS)}")


def compute_cams(
    model: Backbone,
    x: np.ndarray,
    variant: str,
    labels: np.ndarray | None = None,
    rule: str = "predicted",
    batch_size: int = 64,
    score_chunk: int | None = None,
    progress: bool = False,
    desc: str = "CAMs",
) -> CamBatch:
    """Maps of every CAM layer for every image, one forward/backward per batch.

    ``score_chunk``: Score-CAM's masked inputs per forward pass; by default
    about 4M input pixels/voxels, at most 1,024 inputs (191 volumes at 28^3,
    1,024 images at 28^2): larger passes measured faster on a CPU than the old
    128, above all when the CPU is shared."""
    check_variant(variant)
    row = CAMS[variant]
    device = next(model.parameters()).device
    model.eval()
    scorer = _scoring_net(model) if row.needs_scorer else None  # before the hooks: fuse copies the model
    chunk = score_chunk or max(1, min(SCORE_CHUNK_MAX, SCORE_CHUNK_PIXELS // int(np.prod(x.shape[2:]))))
    hooks = _Activations(model, graph_from_first=row.uses_gradients)
    maps: dict[str, list[np.ndarray]] = {name: [] for name in CAM_LAYERS}
    targets_all, probs_all = [], []
    from tqdm.auto import tqdm

    try:
        with _frozen(model):
            for i in tqdm(range(0, len(x), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
                xb = to_device(images_in(x, i, i + batch_size), device)
                lb = None if labels is None else to_device(np.asarray(labels[i : i + batch_size]), device)
                with torch.enable_grad():
                    logits = model(xb)
                    acts = {name: hooks.out[name] for name in CAM_LAYERS}
                    targets = cam_targets(logits.detach(), lb, rule)
                    grads = dict.fromkeys(CAM_LAYERS)
                    if row.uses_gradients:
                        score = logits.gather(1, targets[:, None]).sum()
                        grads = dict(zip(CAM_LAYERS, torch.autograd.grad(score, [acts[n] for n in CAM_LAYERS])))
                with torch.no_grad():
                    for name in CAM_LAYERS:
                        a = acts[name].detach()
                        inp = LayerInputs(acts=a, grads=grads[name], x=xb, targets=targets, scorer=scorer, chunk=chunk)
                        cam = (normalise_maps(F.relu(row.projection(inp))) if row.projection is not None
                               else _combine(a, row.weights(inp)))
                        maps[name].append(cam.float().cpu().numpy())
                targets_all.append(targets.cpu().numpy())
                probs_all.append(torch.softmax(logits.detach(), dim=1).float().cpu().numpy())
    finally:
        hooks.close()
    return CamBatch(
        maps={k: np.concatenate(v) for k, v in maps.items()},
        targets=np.concatenate(targets_all).astype(np.int64),
        probs=np.concatenate(probs_all),
    )
