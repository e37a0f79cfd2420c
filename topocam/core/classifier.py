"""g_psi: a small MLP on the Betti-curve features.

Hidden sizes configurable (paper: 128, 64), ReLU, Adam, cross-entropy.
Features are standardised with statistics of the fitting data only.
Early stopping (patience, keeping the best epoch) on an inner split carved from
the TRAINING split (:func:`fit_on_train`: stratified, seeded), so validation is
used once, for choices (DESIGN.md §2.8). Neither validation nor test data
enter fitting.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import TopoCAMError


@dataclass(frozen=True)
class MLPSettings:
    hidden: tuple[int, ...] = (128, 64)
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_epochs: int = 300
    patience: int = 30
    batch_size: int = 128

    def __post_init__(self):
        if not self.hidden or any(int(h) < 1 for h in self.hidden):
            raise TopoCAMError(f"MLP hidden sizes must be positive integers, got {self.hidden}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise TopoCAMError(f"MLP lr must be > 0 and weight decay >= 0, got {self.lr}, {self.weight_decay}")


def _mlp(n_in: int, hidden: tuple[int, ...], n_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, int(h)), nn.ReLU()]
        n_in = int(h)
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


@dataclass
class TopoMLP:
    """A fitted classifier: scaler statistics plus the network."""

    mean: np.ndarray
    scale: np.ndarray
    net: nn.Sequential
    best_epoch: int
    history: list[float] = field(default_factory=list)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(((x - self.mean) / self.scale).astype(np.float32))
        self.net.eval()
        with one_thread(), torch.no_grad():
            return torch.softmax(self.net(z), dim=1).numpy()  # CPU tensor: the MLP stays on the CPU


@contextmanager
def one_thread():
    """Run torch on one intra-op thread, then restore the setting.

    The MLP is tiny (~10^4 parameters, batches of 128): every op costs more in
    thread hand-off than in arithmetic, and on a busy 2-core machine torch's
    OpenMP workers spin against the other processes (measured on
    AdrenalMNIST3D features: 13-17 s wall with 2 threads, 0.7 s with 1, same
    bits). One thread also makes the fit independent of the core count."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


EARLY_STOP_FRACTION = 0.2  # share of the training split held out for the MLP's early stopping


def inner_split(y: np.ndarray, seed: int, fraction: float = EARLY_STOP_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, stop) of a stratified, seeded split of the training split: the
    early-stopping data of the MLP (the one owner of that rule)."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(y).reshape(-1)
    classes, counts = np.unique(y, return_counts=True)
    n_stop = max(len(classes), int(round(fraction * len(y))))
    if counts.min() < 2 or len(y) - n_stop < len(classes):
        raise TopoCAMError(
            f"the training split ({len(y)} images, class counts {dict(zip(classes.tolist(), counts.tolist()))}) is too "
            "small to hold out an early-stopping split with every class on both sides; use more training images"
        )
    idx = np.arange(len(y))
    fit, stop = train_test_split(idx, test_size=n_stop, stratify=y, random_state=seed % (2**32))
    return np.sort(fit), np.sort(stop)


def fit_on_train(x_train: np.ndarray, y_train: np.ndarray, n_classes: int, settings: MLPSettings, seed: int) -> TopoMLP:
    """g_psi fitted on the training split alone: early stopping on its inner split."""
    fit, stop = inner_split(y_train, seed)
    return fit_mlp(x_train[fit], y_train[fit], x_train[stop], y_train[stop], n_classes, settings, seed)


def fit_mlp(
    x_fit: np.ndarray, y_fit: np.ndarray, x_stop: np.ndarray, y_stop: np.ndarray,
    n_classes: int, settings: MLPSettings, seed: int,
) -> TopoMLP:
    """Fit on ``x_fit``, stop early on the loss of ``x_stop`` (callers pass an inner
    split of train: :func:`fit_on_train`)."""
    with one_thread():
        return _fit_mlp(x_fit, y_fit, x_stop, y_stop, n_classes, settings, seed)


def _fit_mlp(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
    n_classes: int, settings: MLPSettings, seed: int,
) -> TopoMLP:
    mean = x_train.mean(axis=0)
    scale = x_train.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    ztr = torch.from_numpy(((x_train - mean) / scale).astype(np.float32))
    zva = torch.from_numpy(((x_val - mean) / scale).astype(np.float32))
    ytr = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    yva = torch.from_numpy(np.asarray(y_val, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = _mlp(ztr.shape[1], tuple(settings.hidden), n_classes)
    # foreach: the same update, bit for bit, as the default per-tensor loop on CPU, with fewer op dispatches
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, foreach=True)
    loss_fn = nn.CrossEntropyLoss()
    best_loss, best_epoch, best_state = float("inf"), 0, None
    history: list[float] = []
    for epoch in range(1, settings.max_epochs + 1):
        net.train()
        perm = torch.randperm(len(ztr), generator=gen)
        for i in range(0, len(ztr), settings.batch_size):
            idx = perm[i : i + settings.batch_size]
            opt.zero_grad()
            loss_fn(net(ztr[idx]), ytr[idx]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            vloss = float(loss_fn(net(zva), yva))
        history.append(vloss)
        if vloss < best_loss - 1e-6:
            best_loss, best_epoch = vloss, epoch
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        elif epoch - best_epoch >= settings.patience:
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    return TopoMLP(mean, scale, net, best_epoch, history)


@dataclass(frozen=True)
class Classifier:
    """g_psi as a stage: the MLP's settings, its seed and its early-stopping rule.
    ``stop="inner"`` (the protocol) stops on an inner split carved from train;
    ``stop="val"`` is the leakage audit's shortcut (validation stops the MLP it
    then scores) and needs the validation split."""

    settings: MLPSettings
    seed: int = 0
    stop: str = "inner"

    @classmethod
    def of(cls, cfg) -> "Classifier":
        return cls(cfg.mlp_settings(), cfg.seed, cfg.mlp_stop)

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, n_classes: int,
            x_val: np.ndarray | None = None, y_val: np.ndarray | None = None) -> TopoMLP:
        if self.stop == "val":
            if x_val is None or y_val is None:
                raise TopoCAMError("mlp_stop = 'val' (the leakage audit's shortcut) needs the validation split")
            return fit_mlp(x_train, y_train, x_val, y_val, n_classes, self.settings, self.seed)
        return fit_on_train(x_train, y_train, n_classes, self.settings, self.seed)
