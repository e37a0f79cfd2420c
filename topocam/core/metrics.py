"""Metrics with MedMNIST's own definitions (so numbers compare with its tables).

AUC and ACC are medmnist.evaluator's getAUC / getACC: binary AUC on the
positive-class score, macro one-vs-rest AUC for multi-class; ACC at 0.5 for
binary, argmax for multi-class. Sensitivity, specificity and F1 are for the
positive class (binary) or macro-averaged over classes (multi-class).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

METRICS: tuple[str, ...] = ("auc", "acc", "sensitivity", "specificity", "f1")


def predicted_labels(probs: np.ndarray, task: str) -> np.ndarray:
    if task == "binary-class":
        return (probs[:, -1] > 0.5).astype(np.int64)
    return probs.argmax(axis=1).astype(np.int64)


def evaluate(y_true: np.ndarray, probs: np.ndarray, task: str) -> dict[str, float]:
    from medmnist.evaluator import getACC, getAUC

    y_true = np.asarray(y_true).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    present = np.unique(y_true)
    # AUC is undefined when a split holds one class only: report NaN, not a number.
    auc = float(getAUC(y_true, probs, task)) if present.size >= 2 else float("nan")
    acc = float(getACC(y_true, probs, task))
    y_pred = predicted_labels(probs, task)
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(k))
    tp = np.diag(cm).astype(float)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        spec = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
    if task == "binary-class":
        out_sens, out_spec = sens[1], spec[1]
        f1 = f1_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0)
    else:
        out_sens, out_spec = np.nanmean(sens), np.nanmean(spec)
        f1 = f1_score(y_true, y_pred, labels=np.arange(k), average="macro", zero_division=0)
    return {"auc": auc, "acc": acc, "sensitivity": float(out_sens), "specificity": float(out_spec), "f1": float(f1)}
