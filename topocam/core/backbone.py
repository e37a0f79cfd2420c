"""f_theta: the CNN backbone, its fine-tuning, and its on-disk checkpoint cache.

Backbones (all expose ``layer2``, ``layer3``, ``layer4`` for the CAMs):

* ``resnet18`` (2D) and ``r3d18`` (3D) from torchvision;
* ``small``: a 4-stage CNN of the same layout (2D or 3D) for fast CPU runs and tests.

Small inputs. At 28 px the stock ResNet-18 stem (7x7 stride-2 conv + max-pool)
shrinks layer4 to 1x1, and R3D-18's stem leaves 4x2x2 at 28^3: such CAMs carry
no spatial information. For inputs under 112 px per side we therefore use the
stem of MedMNIST's own 28-px baselines: a 3x3(x3) stride-1 convolution and no
pooling. The CAM layers then have, at 28 (2D or 3D): layer2 14, layer3 7,
layer4 4 per side; at 64: 32/16/8. At 112 px and above the stock stem is kept
(224 px: 28/14/7). We adapt the stem rather than resize to 224 px / 64^3 as the
paper does because resizing costs ~64x (2D) and ~12x (3D) more compute per image
for the same information.

Grayscale input is replicated to 3 channels inside the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path, write_failure
from .choices import BACKBONES, choice_enum
from .data import SPLITS, Dataset, Images, images_in
from .errors import InfrastructureError, TopoCAMError
from .seeding import seed_everything
from .locks import BadEntry, load_or_build
from .memory import images_per_chunk

CAM_LAYERS: tuple[str, ...] = ("layer2", "layer3", "layer4")
SMALL_INPUT = 112  # below this many px per side the stem is adapted (see module doc)
CACHE_ENV = "TOPOCAM_CACHE_DIR"
_CODE_VERSION = "3"  # bump when training code changes what a cached checkpoint means (3: BatchNorm recalibration)
SELECT_AUC = "val_auc (ties: lower val loss)"
SELECT_LOSS = "val_loss (validation holds one class: AUC undefined)"
_Info = TypeVar("_Info")  # the info dataclass stored beside a checkpoint's weights


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "topocam")


def check_cache_dir(path: str | Path | None) -> Path:
    """The cache folder (``--cache-dir``, TOPOCAM_CACHE_DIR or the default), or a
    TopoCAMError if it, or the nearest existing folder above it, is a file, or if it
    does not exist and cannot be made there: checked before any work, instead of a
    traceback at the end of backbone training. An existing cache folder may be
    read-only (a warm cache shared on a cluster): its entries are read, and one that
    must be built is refused, naming it, before it is built (:func:`load_or_build`)."""
    folder = Path(path) if path else default_cache_dir()
    for q in (folder, *folder.parents):
        if not q.exists():
            continue
        if not q.is_dir():
            where = "is a file" if q == folder else f"lies under {q}, which is a file"
            raise TopoCAMError(f"cache folder {folder} {where}; choose another --cache-dir (or {CACHE_ENV})")
        if q != folder and not os.access(q, os.W_OK | os.X_OK):
            raise TopoCAMError(f"cache folder {folder} does not exist and cannot be created: {q} is read-only; "
                               f"choose another --cache-dir (or {CACHE_ENV})")
        break
    return folder


def resolve_backbone(name: str, ndim: int) -> str:
    if name not in BACKBONES:
        raise TopoCAMError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if name == "auto":
        return "resnet18" if ndim == 2 else "r3d18"
    if name == "resnet18" and ndim != 2:
        raise TopoCAMError("backbone resnet18 is 2D; use r3d18 or small for 3D data")
    if name == "r3d18" and ndim != 3:
        raise TopoCAMError("backbone r3d18 is 3D; use resnet18 or small for 2D data")
    return name


class _Block(nn.Module):
    def __init__(self, conv, bn, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            conv(cin, cout, 3, stride, 1, bias=False), bn(cout), nn.ReLU(inplace=True),
            conv(cout, cout, 3, 1, 1, bias=False), bn(cout), nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.body(x)


class SmallCNN(nn.Module):
    """ResNet-like layout (stem, layer1..layer4, pooled linear head), few channels."""

    def __init__(self, ndim: int, n_classes: int, width: int = 16):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if ndim == 2 else (nn.Conv3d, nn.BatchNorm3d)
        pool = nn.AdaptiveAvgPool2d(1) if ndim == 2 else nn.AdaptiveAvgPool3d(1)
        w = width
        self.layer1 = _Block(conv, bn, 3, w, 1)
        self.layer2 = _Block(conv, bn, w, 2 * w, 2)
        self.layer3 = _Block(conv, bn, 2 * w, 4 * w, 2)
        self.layer4 = _Block(conv, bn, 4 * w, 8 * w, 2)
        self.pool = pool
        self.fc = nn.Linear(8 * w, n_classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Backbone(nn.Module):
    """Wraps a network: replicates grayscale to 3 channels and exposes the CAM layers."""

    def __init__(self, net: nn.Module, arch: str):
        super().__init__()
        self.net = net
        self.arch = arch

    def cam_layers(self) -> dict[str, nn.Module]:
        return {name: getattr(self.net, name) for name in CAM_LAYERS}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, *x.shape[2:])
        return self.net(x)


def _weights_path(weights) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _local_weights(weights) -> Path | None:
    """The torchvision weight file if it is already on disk (never downloads)."""
    path = _weights_path(weights)
    return path if path.is_file() else None


INITS: tuple[str, ...] = ("auto", "pretrained", "scratch")


def check_init(init: str) -> str:
    if init not in INITS:
        raise TopoCAMError(f"unknown backbone init {init!r}; choose one of {', '.join(INITS)}")
    return init


def pretrained_weights_file(arch: str) -> tuple[Path | None, str]:
    """The pretrained weight file an architecture would start from, if on disk, and
    a sentence saying where it is or why there is none (never downloads)."""
    if arch == "resnet18":
        from torchvision.models import ResNet18_Weights as W

        weights = W.IMAGENET1K_V1
    elif arch == "r3d18":
        from torchvision.models.video import R3D_18_Weights as W

        weights = W.KINETICS400_V1
    else:
        return None, f"the {arch!r} backbone has no pretrained weights (use resnet18 in 2D or r3d18 in 3D)"
    path = _local_weights(weights)
    if path is not None:
        return path, f"pretrained weights from {path}"
    return None, f"pretrained weight file {_weights_path(weights)} is absent (download {weights.url} there)"


def build_backbone(arch: str, ndim: int, n_classes: int, input_size: int, init: str = "auto") -> tuple[Backbone, str]:
    """Returns the model and where its initial weights came from."""
    arch = resolve_backbone(arch, ndim)
    check_init(init)
    if init == "pretrained":
        found, why = pretrained_weights_file(arch)
        if found is None:
            raise TopoCAMError(f"backbone init 'pretrained': {why}")
    small = input_size < SMALL_INPUT
    origin = "scratch"
    if arch == "small":
        net: nn.Module = SmallCNN(ndim, n_classes)
    elif arch == "resnet18":
        from torchvision.models import ResNet18_Weights, resnet18

        net = resnet18(weights=None)
        wfile = None if init == "scratch" else _local_weights(ResNet18_Weights.IMAGENET1K_V1)
        if wfile is not None:
            net.load_state_dict(torch.load(wfile, map_location="cpu", weights_only=True))
            origin = "imagenet1k_v1"
        if small:
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
            origin += "+small-stem"
        net.fc = nn.Linear(net.fc.in_features, n_classes)
    else:
        from torchvision.models.video import R3D_18_Weights, r3d_18

        net = r3d_18(weights=None)
        wfile = None if init == "scratch" else _local_weights(R3D_18_Weights.KINETICS400_V1)
        if wfile is not None:
            net.load_state_dict(torch.load(wfile, map_location="cpu", weights_only=True))
            origin = "kinetics400_v1"
        if small:
            net.stem = nn.Sequential(nn.Conv3d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm3d(64), nn.ReLU(inplace=True))
            origin += "+small-stem"
        net.fc = nn.Linear(net.fc.in_features, n_classes)
    return Backbone(net, arch), origin


# The backbone's training defaults, defined once (CLI, study files, TopoCAMConfig and TrainSettings read them).
# infer_batch / bn_batch / micro_batch: None = derived from TOPOCAM_CHUNK_VOXELS at the data's size (resolve_batches).
DEFAULT_RECIPE: dict = {"epochs": 10, "batch_size": 32, "lr": 1e-3, "milestones": (), "infer_batch": None, "bn_batch": None,
                        "micro_batch": None, "amp": False}
# The inference and BatchNorm-recalibration batch the backbones cached before these were settings were
# made with: a key holds them only where they differ, so every 28-px key stays what it was.
KEYLESS_BATCH = 128
CAM_BATCH = 64  # the CAMs' batch at 28 px (gradients of 64 images at once)


@dataclass
class TrainSettings:
    arch: str = "auto"
    epochs: int = DEFAULT_RECIPE["epochs"]
    batch_size: int = DEFAULT_RECIPE["batch_size"]
    lr: float = DEFAULT_RECIPE["lr"]
    seed: int = 0
    milestones: tuple[int, ...] = DEFAULT_RECIPE["milestones"]  # epochs after which lr is divided by 10 (MultiStepLR)
    init: str = "auto"  # "auto": pretrained weights when on disk; "pretrained": required; "scratch": never
    infer_batch: int | None = None  # inference batch (probabilities, embeddings; CAMs at min(64, it)); None: derived
    bn_batch: int | None = None  # BatchNorm-recalibration batch; None: derived
    micro_batch: int | None = None  # images a training forward/backward holds (gradients accumulate); None: derived
    amp: bool = False  # automatic mixed precision while fine-tuning (CUDA only); inference and CAMs stay float32


def default_batch(shape: tuple[int, ...]) -> int:
    """The inference / recalibration batch at images of ``shape`` (spatial) unless set:
    as many images as ``TOPOCAM_CHUNK_VOXELS`` holds, at most 128 (128 at 28^2, 28^3
    and 64^2; 16 at 64^3 with the default chunk). Why: at 64^3 the 128-volume batches
    were what was left of ``topocam run``'s peak (BatchNorm recalibration in train
    mode held 8 GB)."""
    return images_per_chunk(shape, cap=KEYLESS_BATCH)


def default_micro_batch(shape: tuple[int, ...]) -> int:
    """The training micro-batch unless set: the images a chunk holds, at least 2 (BatchNorm
    needs two); :func:`resolve_batches` caps it at the batch, so wherever a chunk holds the
    batch (every size up to 64^2 with the default chunk) nothing changes. Why: at 64^3 one
    training step of 32 volumes (4.7 GB) was left as ``topocam run``'s peak once inference
    was bounded."""
    return max(2, images_per_chunk(shape))


def resolve_batches(settings: "TrainSettings", shape: tuple[int, ...]) -> "TrainSettings":
    """``settings`` with the inference, recalibration and training micro-batches decided for ``shape``."""
    micro = min(settings.batch_size, settings.micro_batch or default_micro_batch(shape))
    return replace(settings, infer_batch=settings.infer_batch or default_batch(shape),
                   bn_batch=settings.bn_batch or default_batch(shape), micro_batch=micro)


def micro_batches(idx: torch.Tensor, micro: int) -> list[torch.Tensor]:
    """A training batch's rows in near-equal parts of at most ``micro`` images, none of
    one image (BatchNorm cannot train on it): a batch of 33 at 16 is 11+11+11, not 16+16+1."""
    parts = max(1, min(-(-len(idx) // micro), len(idx) // 2))
    return list(torch.tensor_split(idx, parts))


# Named training recipes, the one declaration of the presets (the CLI's --preset and the
# study files' [backbone] preset are its keys). "medmnist_v2": MedMNIST v2's ResNet baselines
# (Yang et al. 2023): 100 epochs, Adam lr 0.001 divided by 10 at epochs 50 and 75, batch 128,
# so our CNN baseline can be set beside their published table.
PRESETS: dict[str, dict] = {
    "medmnist_v2": {"epochs": 100, "batch_size": 128, "lr": 1e-3, "milestones": (50, 75), "infer_batch": None, "bn_batch": None,
                    "micro_batch": None, "amp": False},
}
PresetChoice = choice_enum("PresetChoice", tuple(PRESETS))  # the CLI's --preset


def training_recipe(preset: str | None = None, **overrides) -> dict:
    """epochs, batch_size, lr and milestones: the defaults, or a named preset's, with the
    values a user set explicitly (not None) on top. The one place both the CLI and study
    files get them from."""
    if preset is not None and preset not in PRESETS:
        raise TopoCAMError(f"unknown training preset {preset!r}; choose one of {', '.join(PRESETS)}")
    recipe = dict(PRESETS[preset] if preset is not None else DEFAULT_RECIPE)
    unknown = set(overrides) - set(recipe)
    if unknown:
        raise TypeError(f"not a training setting: {sorted(unknown)}")
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    recipe["milestones"] = tuple(recipe["milestones"])
    return recipe


@dataclass
class BackboneInfo:
    """What determines a checkpoint and what happened when it was trained."""

    arch: str
    settings: dict
    dataset: str
    init: str  # scratch / imagenet1k_v1 / kinetics400_v1 (+small-stem)
    best_epoch: int
    best_val_auc: float
    best_val_loss: float = float("nan")
    selected_by: str = SELECT_AUC
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    cache_key: str = ""
    cached: bool = False
    device: str = ""  # where it was trained ("" before this was recorded); not in its key: any device may reuse it


DEVICE_ENV = "TOPOCAM_DEVICE"  # where an exported model's backbone runs when it is loaded (serve, predict, app; default auto)
DEVICE_HELP = "auto (a GPU where CUDA sees one, else the CPU), cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(value) -> str:
    """A device name as the ``device`` setting takes it (the availability is :func:`resolve_device`'s)."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise TopoCAMError(f"device must be {DEVICE_HELP} (--device, or [backbone] device in a study file), got {value!r}")
    return value


def resolve_device(value: str = "auto") -> torch.device:
    """The torch device a ``device`` setting names on this machine; a one-line TopoCAMError
    naming the option where it asks for a GPU that is not there."""
    value = check_device(value)
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise TopoCAMError(f"--device {value}: {why} on this machine (torch {torch.__version__}); "
                           "use --device cpu or --device auto ([backbone] device in a study file)")
    n = torch.cuda.device_count()
    index = int(value.split(":")[1]) if ":" in value else 0
    if index >= n:
        raise TopoCAMError(f"--device {value}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return torch.device("cuda", index)


def device_auto() -> torch.device:
    return resolve_device("auto")


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """An array as a tensor on ``device``: on a GPU copied from pinned memory without blocking
    (the next batch is prepared while this one computes); on the CPU the array itself, no copy."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@torch.no_grad()
def predict_proba(
    model: nn.Module, x: "np.ndarray | Images", batch_size: int = 128, device: torch.device | None = None,
) -> np.ndarray:
    """Softmax outputs, (n, k) float32. The batch stays 128 whatever the image size:
    on a CPU an image's outputs can differ in the last bit between batch sizes
    (tests/test_memory.py shows it), and these feed the CAM target rule."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = to_device(images_in(x, i, i + batch_size), device)
        out.append(torch.softmax(model(xb), dim=1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


@torch.no_grad()
def embed(model: Backbone, x: "np.ndarray | Images", batch_size: int = 128) -> np.ndarray:
    """The pooled embedding the classification layer (``net.fc``) reads, (n, d) float32."""
    device = next(model.parameters()).device
    model.eval()
    seen: list[torch.Tensor] = []
    hook = model.net.fc.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().float().cpu()))
    try:
        for i in range(0, len(x), batch_size):
            model(to_device(images_in(x, i, i + batch_size), device))
    finally:
        hook.remove()
    return torch.cat(seen).numpy() if seen else np.zeros((0, 0), dtype=np.float32)  # CPU tensor: the hook's .cpu()


@torch.no_grad()  # statistics only: no autograd graph (at 64^3 it held every activation of a 128-volume batch)
def recalibrate_batchnorm(
    model: nn.Module, x: "np.ndarray | Images", batch_size: int = 128, device: torch.device | None = None,
) -> int:
    """Replace every BatchNorm layer's running statistics by their exact average
    over ``x`` (the training split), in the weights' current state.

    Why: after few optimiser steps the running statistics are an exponential
    average of batch statistics from *earlier* weights, so in eval mode the
    network sees shifted activations; on the quickstart this made a backbone
    with validation AUC 0.99 predict one class for every image. Averaging with
    ``momentum=None`` over one pass (as ``torch.optim.swa_utils.update_bn``
    does) gives the population statistics of the weights being evaluated.
    Returns the number of BatchNorm layers recalibrated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(x) < 2:
        return 0
    device = device or next(model.parameters()).device
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    model.train()
    try:
        starts = list(range(0, len(x), batch_size))
        if len(x) - starts[-1] < 2 and len(starts) > 1:  # a batch of one has no variance: fold it into the previous
            starts.pop()
        for k, i in enumerate(starts):
            j = starts[k + 1] if k + 1 < len(starts) else len(x)
            model(to_device(images_in(x, i, j), device))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return len(bns)


def selection_key(val_auc: float, val_loss: float) -> tuple[float, float]:
    """The checkpoint rule, in one place: highest validation AUC, ties broken by the
    lower validation loss (the first epoch to reach the top AUC no longer wins by
    default). Where the AUC is undefined (a validation split of one class) the
    loss alone decides."""
    return (val_auc if math.isfinite(val_auc) else -math.inf, -val_loss if math.isfinite(val_loss) else -math.inf)


def backbone_key(ds: Dataset, s: TrainSettings, arch: str) -> str:
    settings = asdict(resolve_batches(s, ds.shape))
    for batch in ("infer_batch", "bn_batch"):  # at 128 they are what every checkpoint before them was made with
        if settings[batch] == KEYLESS_BATCH:
            del settings[batch]
    if settings["micro_batch"] == settings["batch_size"]:  # whole batches: how every checkpoint before it trained
        del settings["micro_batch"]
    if not settings["amp"]:  # float32 training: what every checkpoint before the option was
        del settings["amp"]
    # "auto" keeps the keys of checkpoints trained before the option existed; an architecture without
    # pretrained weights starts from scratch whatever is asked, so "scratch" must not train it again
    if settings["init"] == "auto" or (arch == "small" and settings["init"] == "scratch"):
        del settings["init"]
    blob = json.dumps({"data": ds.fingerprint, "arch": arch, "settings": settings, "code": _CODE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _val_loss(y: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    return float(-np.log(p).mean())


def train_backbone(
    ds: Dataset,
    settings: TrainSettings,
    cache_dir: Path | None = None,
    progress: bool = True,
    device: torch.device | None = None,
) -> tuple[Backbone, BackboneInfo]:
    """Fine-tune on train, keep the epoch chosen by :func:`selection_key` on validation.

    After every epoch the BatchNorm statistics are recalibrated on the training
    split (:func:`recalibrate_batchnorm`), so the network validated, selected,
    cached and used for CAMs is the one that eval mode actually runs. The test
    split is never read here. Cached on disk by everything that determines the
    result; a second call with the same inputs loads it. Processes sharing the cache
    train a given backbone once: the others wait for the checkpoint and load it
    (:func:`topocam.stores.load_or_build`); a checkpoint that cannot be read back is
    named in a ``CorruptCacheWarning`` and retrained."""
    arch = resolve_backbone(settings.arch, ds.ndim)
    if settings.epochs < 1:
        raise TopoCAMError(f"epochs must be >= 1, got {settings.epochs}")
    device = device or device_auto()
    settings = resolve_batches(settings, ds.shape)
    key = backbone_key(ds, settings, arch)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    ckpt = cache_dir / "backbones" / f"{key}.pt"

    def fresh() -> tuple[Backbone, str]:
        seed_everything(settings.seed)  # before building: the initial weights come from the seed too
        return build_backbone(arch, ds.ndim, ds.n_classes, min(ds.shape), settings.init)

    def load() -> tuple[Backbone, BackboneInfo] | None:
        if not ckpt.is_file():
            return None
        model, _ = fresh()  # a new model each time: a failed load_state_dict leaves one half-loaded
        return model, read_checkpoint(ckpt, model, BackboneInfo)

    def build() -> tuple[Backbone, BackboneInfo]:
        if settings.amp and device.type != "cuda":
            raise TopoCAMError(f"amp = true (mixed precision) trains on CUDA only, and this backbone would train on {device}: "
                               "leave out --amp (amp = false in a study file), or use --device cuda on a GPU machine")
        model, init = fresh()
        info = _fit(model, init, ds, settings, arch, key, progress, device)
        save_checkpoint(ckpt, model, info, "the backbone checkpoint")
        return model, info

    (model, info), cached = load_or_build(ckpt, load, build)
    info.cached = cached
    return model.to(device).eval(), info


def inference_batch(info: BackboneInfo) -> int:
    """The batch a trained backbone runs inference in (its recipe's; checkpoints from
    before the setting: 128)."""
    return int(info.settings.get("infer_batch") or KEYLESS_BATCH)


def cam_batch(info: BackboneInfo) -> int:
    """The batch its CAMs are computed in: 64 (as always at 28 px), at most the inference batch."""
    return min(CAM_BATCH, inference_batch(info))


def cnn_probabilities(model: Backbone, info: BackboneInfo, ds: Dataset, cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """:func:`predict_proba` of every split, cached next to the checkpoint (a function of
    the checkpoint and the data, both in its key). Why: a study worker with a warm
    cache then never runs the backbone, whose batch of 128 volumes of 64^3 alone held
    over 4 GB; the values are the ones computed, bit for bit."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = cache_dir / "backbones" / f"{info.cache_key}.probs.npz"

    def load() -> dict[str, np.ndarray] | None:
        if not entry.is_file():
            return None
        try:
            with np.load(entry, allow_pickle=False) as z:
                probs = {s: z[s] for s in SPLITS}
        except Exception as exc:  # zip, header or a missing split: all mean "not this entry"
            raise BadEntry.because(exc, str(entry)) from exc
        for s, p in probs.items():
            if p.shape != (len(ds.y[s]), ds.n_classes) or not np.isfinite(p).all():
                raise BadEntry(f"{entry}: split {s} holds {p.shape} (expected {(len(ds.y[s]), ds.n_classes)}) or non-finite values")
        return probs

    def build() -> dict[str, np.ndarray]:
        probs = {s: predict_proba(model, ds.x[s], batch_size=inference_batch(info)) for s in SPLITS}
        try:
            with atomic_path(entry) as tmp, open(tmp, "wb") as f:
                np.savez(f, **probs)
        except OSError as exc:
            size = sum(p.nbytes for p in probs.values())
            raise InfrastructureError(f"could not write the CNN probabilities {entry}: {write_failure(exc, entry.parent, size)}") from exc
        return probs

    return load_or_build(entry, load, build)[0]


def save_checkpoint(ckpt: Path, net: nn.Module, info, what: str) -> None:
    """A trained network's weights (on the CPU) and its info dataclass, written whole or not at
    all (the cached backbone, the segmenter); a failed write is an InfrastructureError saying why."""
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    blob = {"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "info": asdict(info)}
    try:
        # a file object, not a path: torch's zip writer then raises its RuntimeError from the
        # OSError of the write (ENOSPC, ...), which says what happened
        with atomic_path(ckpt) as tmp, open(tmp, "wb") as f:
            torch.save(blob, f)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError of its zip writer
        size = sum(v.numel() * v.element_size() for v in blob["state_dict"].values())
        raise InfrastructureError(f"could not write {what} {ckpt}: {write_failure(exc, ckpt.parent, size)}") from exc


def read_checkpoint(ckpt: Path, net: nn.Module, info_type: type[_Info]) -> _Info:
    """Load a checkpoint written by :func:`save_checkpoint` into ``net`` and return its info;
    :class:`BadEntry` if the file is truncated or unreadable, does not fit the network, or holds
    non-finite weights (all of which a kill -9 or a disk error can leave), so it is rebuilt
    rather than used or reported as a raw torch traceback."""
    try:
        blob = torch.load(ckpt, map_location="cpu", weights_only=False)
        state = blob["state_dict"]
        nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if nonfinite:
            raise BadEntry(f"non-finite values in {nonfinite[0]}")
        net.load_state_dict(state)
        info = info_type(**blob["info"])
    except BadEntry:
        raise
    except Exception as exc:  # torch's zip reader, unpickling, a missing key, shapes that do not fit
        raise BadEntry.because(exc) from exc
    return info


def batch_gradients(model: nn.Module, loss_fn: nn.Module, x: "np.ndarray | Images", y: np.ndarray, idx: torch.Tensor,
                    micro: int, device: torch.device, scaler: "torch.amp.GradScaler | None" = None) -> float:
    """Accumulate into ``.grad`` the gradient of the mean loss over the rows ``idx``, a
    micro-batch at a time (:func:`micro_batches`); returns the summed loss. Each part's
    loss is weighted by its share of the batch, so without BatchNorm the gradient is the
    whole batch's; a batch in one part is computed exactly as before the setting."""
    parts = micro_batches(idx, micro)
    total = 0.0
    for part in parts:
        rows = part.numpy()  # CPU tensor: the permutation's generator is on the CPU
        xb, yb = to_device(x[rows], device), to_device(y[rows], device)
        with nullcontext() if scaler is None else torch.autocast(device_type="cuda", dtype=torch.float16):
            loss = loss_fn(model(xb), yb)  # mixed precision (CUDA only): float16 forward
        share = loss * (len(part) / len(idx)) if len(parts) > 1 else loss
        (share if scaler is None else scaler.scale(share)).backward()  # scaled against float16 underflow
        total += float(loss.detach()) * len(part)
    return total


def _fit(
    model: Backbone, init: str, ds: Dataset, settings: TrainSettings, arch: str, key: str, progress: bool, device: torch.device
) -> BackboneInfo:
    """Train ``model`` in place; it ends holding the selected epoch's weights."""
    from .metrics import evaluate  # local: metrics is a leaf, keeps import order simple

    one_class_val = np.unique(ds.y["val"]).size < 2
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    if any(m < 1 for m in settings.milestones):
        raise TopoCAMError(f"lr milestones are epochs >= 1, got {list(settings.milestones)}")
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=sorted(settings.milestones), gamma=0.1)
    loss_fn = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cuda") if settings.amp else None  # train_backbone refused amp off CUDA
    xtr = ds.x["train"]  # read a batch at a time (Images hold integer images, converted per batch)
    ytr = ds.y["train"]
    yval = ds.y["val"]
    gen = torch.Generator().manual_seed(settings.seed)
    best_key, best_epoch, best_state, best_auc, best_loss = None, 0, None, float("nan"), float("nan")
    history = []
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    n_batches = (len(xtr) + settings.batch_size - 1) // settings.batch_size
    bar = tqdm(total=settings.epochs * n_batches, desc=f"train {arch}", unit="batch", disable=not progress, leave=False)
    for epoch in range(settings.epochs):
        model.train()
        lr_now = opt.param_groups[0]["lr"]
        perm = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(0, len(xtr), settings.batch_size):
            idx = perm[i : i + settings.batch_size]
            if len(idx) < 2 and len(xtr) >= 2:  # BatchNorm cannot train on a batch of one
                idx = perm[-2:]
            opt.zero_grad()
            total += batch_gradients(model, loss_fn, xtr, ytr, idx, settings.micro_batch, device, scaler)
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            bar.update(1)
        schedule.step()
        recalibrate_batchnorm(model, ds.x["train"], batch_size=settings.bn_batch, device=device)
        probs = predict_proba(model, ds.x["val"], batch_size=settings.infer_batch, device=device)
        val = evaluate(yval, probs, ds.task)
        vloss = _val_loss(yval, probs)
        history.append({"epoch": epoch + 1, "lr": lr_now, "train_loss": total / len(xtr), "val_loss": vloss, "val_auc": val["auc"], "val_acc": val["acc"]})
        bar.set_postfix(val_auc=f"{val['auc']:.3f}", val_loss=f"{vloss:.3f}")
        key_now = selection_key(val["auc"], vloss)
        if best_key is None or key_now > best_key:
            best_key, best_epoch, best_auc, best_loss = key_now, epoch + 1, val["auc"], vloss
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    bar.close()
    model.load_state_dict(best_state)
    info = BackboneInfo(
        arch=arch, settings=asdict(settings), dataset=ds.fingerprint, init=init, best_epoch=best_epoch,
        best_val_auc=float(best_auc), best_val_loss=float(best_loss), selected_by=SELECT_LOSS if one_class_val else SELECT_AUC,
        history=history, train_seconds=time.perf_counter() - t0, cache_key=key, device=str(device),
    )
    return info
