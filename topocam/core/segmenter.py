"""The ``segmenter`` ROI generator: the segment-then-Betti baseline (the paper's Table 8).

A small MONAI U-Net (``monai.networks.nets.UNet``, one sigmoid foreground channel)
is trained on the TRAINING split's ground-truth lesion masks with MONAI's
``DiceLoss``, or with Dice plus a topology-preserving term in the spirit of
TopoLoss (Hu et al., NeurIPS 2019; :func:`topo_loss`). The epoch is chosen on the
validation split's mean Dice (validation is used for that choice only) and the
test split is never read. Seeded (:mod:`.seeding`) and cached like the backbone:
``CACHE/segmenters/{key}.pt``, the key hashing the data fingerprint, the settings
and :data:`_CODE_VERSION`, built once through :func:`.locks.load_or_build`,
written atomically, a corrupt entry named and rebuilt.

Topology convention, the one of :mod:`.betti_fast` and GUDHI's ``CubicalComplex``
on top-dimensional cells: a mask's pixels/voxels are closed cubes, so its
components are 8-connected (2D) / 26-connected (3D), and its holes / cavities are
the components of the background (4- / 6-connected) that do not touch the border.
The loss's superlevel filtration of the probability is the sublevel filtration of
``1 - proba`` in that same complex, so the Betti numbers it steers towards are the
ones :func:`betti_numbers` counts.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import default_cache_dir, device_auto, read_checkpoint, save_checkpoint
from .betti_fast import betti_curves_fast
from .data import Dataset, images_in
from .errors import TopoCAMError
from .locks import load_or_build
from .seeding import seed_everything

SEGMENTER_LOSSES: tuple[str, ...] = ("dice", "dice+topo")
_CODE_VERSION = "1"  # bump when training code changes what a cached segmenter means
PREDICT_BATCH = 64  # fixed, whatever the image size: a CPU's last bit can depend on the batch


@dataclass(frozen=True)
class SegmenterSettings:
    """Everything that determines the trained network (all of it is in the cache key).

    The defaults are sized for the 16-28 px synthetic sets on a CPU, and were chosen on
    the VALIDATION split of synthetic2d (24 px, data seed 0; benchmarks/segmenter_topo.py
    reports on another data seed): a 4-level U-Net of 8/16/32/32 channels whose first
    level keeps the full resolution (strides 1, 2, 2: with MONAI's first stride 2 no layer
    sees full resolution, and the 3-px hole was filled in by all 5 variants tried; with it,
    Dice alone still filled it for 2 model seeds of 3), 30 epochs of
    Adam at 1e-2. ``dice+topo`` adds the topology term from the first epoch
    (``topo_warmup`` 0) at weight 0.3: after a Dice-only warm-up, as Hu et al. pretrain,
    the sigmoid has saturated over the lesion, the term's gradient through it is ~0 and a
    filled hole stays filled (seen with 10 epochs of warm-up); at weight 1.0 one of two
    seeds collapsed (validation Dice 0.78). Not tuned for 3D: on synthetic3d at 16 px (a
    one-voxel cavity) these defaults collapse ``dice+topo`` (test Dice 0.26 ± 0.26 over 3
    seeds, against 0.99 for ``dice``; the first epoch's topology term, over ~10^3 noise
    pairs per volume, flattens the map), and neither weight 0.03 nor 5 warm-up epochs
    found the cavity (validation, one seed). ``topo_weight`` and ``topo_warmup`` only
    matter for ``dice+topo`` (a ``dice`` network's cache key leaves them out)."""

    loss: str = "dice"  # one of SEGMENTER_LOSSES
    epochs: int = 30
    lr: float = 1e-2
    topo_weight: float = 0.3  # weight of topo_loss in "dice+topo" (its terms are squared probabilities, O(1) per image)
    topo_warmup: int = 0  # "dice+topo": epochs of Dice alone before the term is added (see above why 0)
    seed: int = 0
    batch_size: int = 16
    channels: tuple[int, ...] = (8, 16, 32, 32)
    strides: tuple[int, ...] = (1, 2, 2)
    num_res_units: int = 2

    def check(self) -> None:
        if self.loss not in SEGMENTER_LOSSES:
            raise TopoCAMError(f"unknown segmenter loss {self.loss!r}; choose one of {', '.join(SEGMENTER_LOSSES)}")
        if self.epochs < 1:
            raise TopoCAMError(f"segmenter epochs must be >= 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TopoCAMError(f"segmenter lr must be a positive number, got {self.lr}")
        if not (self.topo_weight >= 0 and math.isfinite(self.topo_weight)):
            raise TopoCAMError(f"segmenter topo_weight must be >= 0, got {self.topo_weight}")
        if self.topo_warmup < 0:
            raise TopoCAMError(f"segmenter topo_warmup must be >= 0 epochs, got {self.topo_warmup}")
        if self.batch_size < 1:
            raise TopoCAMError(f"segmenter batch_size must be >= 1, got {self.batch_size}")
        if len(self.channels) != len(self.strides) + 1 or min(self.channels, default=0) < 1 or min(self.strides, default=1) < 1:
            raise TopoCAMError(
                f"segmenter channels {list(self.channels)} need one more entry than strides {list(self.strides)}, all >= 1"
            )


@dataclass
class SegmenterInfo:
    """What was trained, how it was chosen, and whether it came from the cache."""

    settings: dict
    dataset: str
    epochs: int
    best_epoch: int
    best_val_dice: float
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    cache_key: str = ""
    cached: bool = False

    @property
    def loss(self) -> str:
        return self.settings["loss"]


# ------------------------------------------------------------------- topology


def betti_numbers_batch(masks: np.ndarray) -> np.ndarray:
    """(n, d) int64 Betti numbers (beta_0 .. beta_{d-1}) of a batch of binary 2D (n, H, W)
    or 3D (n, D, H, W) masks, by the exact fast kernel (:mod:`.betti_fast`): a mask's
    pixels enter at 0, the rest at 1, counted at 0.5."""
    m = np.asarray(masks, dtype=bool)
    if m.ndim not in (3, 4):
        raise TopoCAMError(f"expected a batch of 2D or 3D masks, got shape {m.shape}")
    filtration = np.where(m, 0.0, 1.0)
    return betti_curves_fast(filtration, np.array([0.5]))[:, :, 0]


def betti_numbers(mask: np.ndarray) -> tuple[int, ...]:
    """(beta_0, beta_1[, beta_2]) of one binary 2D or 3D mask (see the module doc for the
    connectivity)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim not in (2, 3):
        raise TopoCAMError(f"expected a 2D or 3D mask, got shape {m.shape}")
    return tuple(int(b) for b in betti_numbers_batch(m[None])[0])


def persistence_cells(proba: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per dimension d, the (birth, death) pixels of the persistence pairs of the superlevel
    filtration of ``proba`` (one 2D or 3D image), as C-order flat indices; an essential
    class dies at -1. Only pairs of positive persistence (one of zero persistence adds
    nothing to the loss unless a target exceeds the features present). GUDHI's cubical
    complex on ``1 - proba`` (top-dimensional cells): ``cofaces_of_persistence_pairs``
    names, for each pair, the pixel whose value gives its birth and the one whose value
    gives its death. GUDHI numbers the cells in Fortran order; they are converted here."""
    import gudhi

    p = np.asarray(proba, dtype=np.float64)
    cc = gudhi.CubicalComplex(top_dimensional_cells=1.0 - p)
    cc.compute_persistence(homology_coeff_field=2, min_persistence=0.0)  # pairs of zero persistence left out: 4x faster in 3D
    regular, essential = cc.cofaces_of_persistence_pairs()

    def c_order(idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return np.ravel_multi_index(np.unravel_index(idx, p.shape, order="F"), p.shape) if idx.size else idx

    out = []
    for d in range(p.ndim):
        reg = np.asarray(regular[d], dtype=np.int64).reshape(-1, 2) if d < len(regular) else np.zeros((0, 2), np.int64)
        ess = np.asarray(essential[d], dtype=np.int64).reshape(-1) if d < len(essential) else np.zeros(0, np.int64)
        births = np.concatenate([c_order(reg[:, 0]), c_order(ess)])
        deaths = np.concatenate([c_order(reg[:, 1]), np.full(ess.size, -1, dtype=np.int64)])
        out.append((births, deaths))
    return out


def _topo_loss_one(p: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """TopoLoss of one image: per dimension d, the target[d] most persistent pairs are
    pushed to full persistence ((1 - p_birth)^2 + p_death^2) and the others to none
    ((p_birth - p_death)^2). The pairing is computed on the detached values; the loss
    reads the pixels at each pair's critical cells, so the gradient flows through them
    (the pairing is locally constant in the input). An essential class's death is 0."""
    flat = p.reshape(-1)
    total = flat.new_zeros(())
    cells = persistence_cells(p.detach().cpu().numpy())
    for d, (births, deaths) in enumerate(cells):
        if births.size == 0:
            continue
        b = flat[torch.from_numpy(births).to(flat.device)]
        dd = torch.where(
            torch.from_numpy(deaths >= 0).to(flat.device),
            flat[torch.from_numpy(np.maximum(deaths, 0)).to(flat.device)],
            flat.new_zeros(()),
        )
        pers = (b - dd).detach().cpu().numpy()
        k = int(target[d]) if d < len(target) else 0
        order = np.argsort(-pers, kind="stable")
        keep = torch.zeros(births.size, dtype=torch.bool, device=flat.device)
        keep[torch.from_numpy(order[:k]).to(flat.device)] = True
        total = total + torch.where(keep, (1 - b) ** 2 + dd**2, (b - dd) ** 2).sum()
    return total


def topo_loss(proba: torch.Tensor, target_betti: Sequence[Sequence[int]]) -> torch.Tensor:
    """Mean over the batch of the per-image TopoLoss (:func:`_topo_loss_one`) of
    probabilities ``proba`` (n, *spatial) in [0, 1], each image steered towards its
    ``target_betti`` (beta_0, beta_1[, beta_2]), e.g. :func:`betti_numbers` of its
    ground-truth mask."""
    if proba.ndim not in (3, 4):
        raise TopoCAMError(f"topo_loss expects probabilities (n, H, W) or (n, D, H, W), got shape {tuple(proba.shape)}")
    if len(target_betti) != len(proba):
        raise TopoCAMError(f"topo_loss got {len(target_betti)} target Betti vectors for {len(proba)} images")
    if len(proba) == 0:
        return proba.new_zeros(())
    return torch.stack([_topo_loss_one(p, t) for p, t in zip(proba, target_betti)]).mean()


# ------------------------------------------------------------------- network


def _build_unet(ndim: int, in_channels: int, s: SegmenterSettings) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=ndim, in_channels=in_channels, out_channels=1, channels=tuple(s.channels),
        strides=tuple(s.strides), num_res_units=s.num_res_units,
    )


def _pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pad the spatial axes (at their end, by replication) to a multiple of the U-Net's
    total stride, so its skip connections line up at any image size; returns the sizes
    to crop back to."""
    sizes = tuple(x.shape[2:])
    pad: list[int] = []
    for n in reversed(sizes):  # F.pad lists the last axis first
        pad += [0, (-n) % multiple]
    if any(pad):
        x = F.pad(x, pad, mode="replicate")
    return x, sizes


class Segmenter:
    """A trained U-Net and its :class:`SegmenterInfo`. ``predict_proba`` / ``masks`` take
    images as the dataset holds them, (n, C, *spatial) (or (n, *spatial) for one
    channel), and work through them a fixed batch at a time."""

    def __init__(self, net: nn.Module, info: SegmenterInfo, ndim: int, in_channels: int, total_stride: int):
        self.net = net.eval()
        self.info = info
        self.ndim = ndim
        self.in_channels = in_channels
        self.total_stride = total_stride

    def logits(self, xb: torch.Tensor) -> torch.Tensor:
        """(n, *spatial) logits of a (n, C, *spatial) tensor batch (gradients kept)."""
        padded, sizes = _pad_to(xb, self.total_stride)
        out = self.net(padded)[:, 0]
        return out[(slice(None), *(slice(0, n) for n in sizes))]

    def _batch(self, images, lo: int, hi: int) -> torch.Tensor:
        xb = images_in(images, lo, hi)
        if xb.ndim == self.ndim + 1 and self.in_channels == 1:
            xb = xb[:, None]
        if xb.ndim != self.ndim + 2 or xb.shape[1] != self.in_channels:
            raise TopoCAMError(
                f"the segmenter takes {self.ndim}D images with {self.in_channels} channel(s), (n, C, *spatial); got shape {xb.shape}"
            )
        return torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32))

    @torch.no_grad()
    def predict_proba(self, images) -> np.ndarray:
        """(n, *spatial) float32 foreground probabilities in [0, 1]."""
        self.net.eval()
        device = next(self.net.parameters()).device
        out = [
            torch.sigmoid(self.logits(self._batch(images, lo, lo + PREDICT_BATCH).to(device))).cpu().numpy()
            for lo in range(0, len(images), PREDICT_BATCH)
        ]
        if not out:
            return np.zeros((0, *tuple(images.shape)[-self.ndim:]), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def masks(self, images) -> np.ndarray:
        """(n, *spatial) bool: probability >= 0.5."""
        return self.predict_proba(images) >= 0.5


# ------------------------------------------------------------------- training


def _cache_key(ds: Dataset, s: SegmenterSettings) -> str:
    settings = asdict(s)
    if s.loss == "dice":  # the topology term's settings do not change a Dice-only network
        del settings["topo_weight"], settings["topo_warmup"]
    blob = json.dumps({"data": ds.fingerprint, "masks": _masks_hash(ds), "settings": settings, "code": _CODE_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _masks_hash(ds: Dataset) -> str:
    """The training and validation masks, by content: the data fingerprint hashes the images
    and labels only, and the same images can come with other masks (a generator that
    draws the lesion differently), which must not reuse a network trained on the old ones."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        m = np.ascontiguousarray(ds.lesion_masks[split], dtype=bool)
        h.update(f"{split}{m.shape}".encode())
        h.update(np.packbits(m).tobytes())
    return h.hexdigest()[:20]


def _check_masks(ds: Dataset) -> None:
    if ds.lesion_masks is None:
        raise TopoCAMError(
            "roi = segmenter needs ground-truth lesion masks (the synthetic sets, or an imported dataset with masks); "
            f"{ds.name} has none"
        )
    for split in ("train", "val"):
        m = ds.lesion_masks.get(split)
        want = (len(ds.y[split]), *ds.shape)
        if m is None or tuple(m.shape) != want:
            got = "none" if m is None else tuple(m.shape)
            raise TopoCAMError(f"{ds.name}: the {split} lesion masks must have shape {want}, got {got}")


def train_segmenter(
    ds: Dataset, settings: SegmenterSettings, cache_dir: Path | None = None, progress: bool = False,
    device: torch.device | None = None,
) -> Segmenter:
    """Train (or load from the cache) the U-Net on the training split's lesion masks; the
    epoch with the best mean validation Dice is kept (the first such epoch on ties). The
    test split is never read. Processes sharing the cache build it once. ``device``: as
    the backbone's (CUDA where present); the topology term's persistence runs on the CPU."""
    settings.check()
    _check_masks(ds)  # before the key, which hashes them
    device = device or device_auto()
    key = _cache_key(ds, settings)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    ckpt = cache_dir / "segmenters" / f"{key}.pt"
    total_stride = math.prod(settings.strides)

    def fresh() -> nn.Module:
        seed_everything(settings.seed)  # before building: the initial weights come from the seed
        return _build_unet(ds.ndim, ds.n_channels, settings)

    def load() -> Segmenter | None:
        if not ckpt.is_file():
            return None
        net = fresh()  # a new one each time: a failed load_state_dict leaves one half-loaded
        info = read_checkpoint(ckpt, net, SegmenterInfo)
        return Segmenter(net, info, ds.ndim, ds.n_channels, total_stride)

    def build() -> Segmenter:
        seg = Segmenter(fresh(), SegmenterInfo(asdict(settings), ds.fingerprint, settings.epochs, 0, float("nan"), cache_key=key),
                        ds.ndim, ds.n_channels, total_stride)
        seg.net.to(device)
        _fit(seg, ds, settings, progress, device)
        save_checkpoint(ckpt, seg.net, seg.info, "the segmenter")
        return seg

    seg, cached = load_or_build(ckpt, load, build)
    seg.info.cached = cached
    seg.net.to(device).eval()
    return seg


def _fit(seg: Segmenter, ds: Dataset, s: SegmenterSettings, progress: bool, device: torch.device) -> None:
    """Train ``seg.net`` in place; it ends holding the chosen epoch's weights and
    ``seg.info`` the history. Reads train and val only."""
    from monai.losses import DiceLoss

    from .roi import dice  # local: roi is the stage that calls this generator

    net = seg.net
    opt = torch.optim.Adam(net.parameters(), lr=s.lr)
    dice_loss = DiceLoss(sigmoid=True)
    xtr = ds.x["train"]
    mtr = np.asarray(ds.lesion_masks["train"], dtype=bool)
    mval = np.asarray(ds.lesion_masks["val"], dtype=bool)
    targets = betti_numbers_batch(mtr) if s.loss == "dice+topo" else None
    gen = torch.Generator().manual_seed(s.seed)
    best_dice, best_epoch, best_state = -math.inf, 0, None
    history = []
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=s.epochs, desc=f"segmenter ({s.loss})", unit="epoch", disable=not progress, leave=False)
    for epoch in range(s.epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=gen).numpy()  # CPU tensor
        sums = {"loss": 0.0, "dice_loss": 0.0, "topo_loss": 0.0}
        t_epoch = time.perf_counter()
        for i in range(0, len(perm), s.batch_size):
            idx = np.sort(perm[i : i + s.batch_size])
            xb = torch.from_numpy(np.ascontiguousarray(xtr[idx], dtype=np.float32)).to(device)
            yb = torch.from_numpy(mtr[idx]).float().to(device)
            opt.zero_grad()
            logits = seg.logits(xb)
            ld = dice_loss(logits[:, None], yb[:, None])
            loss = ld
            lt = torch.zeros((), device=device)
            if targets is not None and epoch >= s.topo_warmup:
                lt = topo_loss(torch.sigmoid(logits), [tuple(t) for t in targets[idx]])
                loss = ld + s.topo_weight * lt
            if not torch.isfinite(loss):
                raise TopoCAMError(f"segmenter training diverged (non-finite loss at epoch {epoch + 1}); lower its lr ({s.lr})")
            loss.backward()
            opt.step()
            for name, v in (("loss", loss), ("dice_loss", ld), ("topo_loss", lt)):
                sums[name] += float(v.detach()) * len(idx)
        val_dice = float(dice(seg.masks(ds.x["val"]), mval).mean())
        history.append({"epoch": epoch + 1, **{k: v / len(perm) for k, v in sums.items()}, "val_dice": val_dice,
                        "seconds": time.perf_counter() - t_epoch})
        bar.update(1)
        bar.set_postfix(val_dice=f"{val_dice:.3f}")
        if val_dice > best_dice:
            best_dice, best_epoch = val_dice, epoch + 1
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    bar.close()
    net.load_state_dict(best_state)
    net.eval()
    seg.info.best_epoch, seg.info.best_val_dice = best_epoch, best_dice
    seg.info.history, seg.info.train_seconds = history, time.perf_counter() - t0
