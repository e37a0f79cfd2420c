"""Plots people would rather look at than read: per study and per comparison."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402


def _save(ax_or_fig, path: Path) -> Path:
    fig = ax_or_fig.figure if hasattr(ax_or_fig, "figure") and not isinstance(ax_or_fig, plt.Figure) else ax_or_fig
    if isinstance(fig, np.ndarray):
        fig = fig.flat[0].figure
    fig.set_size_inches(9, 5.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def study_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimisation history, parallel coordinates and parameter importances.
    A plot that cannot be drawn (e.g. importances from fewer than two
    completed trials) is replaced by a text file that says why."""
    from optuna.visualization import matplotlib as ovm

    out = []
    makers = {
        "optimization_history": ovm.plot_optimization_history,
        "parallel_coordinate": ovm.plot_parallel_coordinate,
        "param_importances": ovm.plot_param_importances,
    }
    for name, make in makers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
            try:
                out.append(_save(make(study), folder / f"{name}.png"))
            except Exception as exc:  # too few trials, no variance: explain instead of failing the study
                note = folder / f"{name}.txt"
                note.write_text(f"{name} not drawn: {type(exc).__name__}: {exc}\n")
                out.append(note)
    return out


def comparison_plot(curves: dict[str, np.ndarray], path: Path, title: str, ylabel: str) -> Path:
    """Best-so-far objective vs trials: median line and min-max band over seeds, per sampler."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for sampler, c in curves.items():  # c: (n_seeds, n_trials)
        x = np.arange(1, c.shape[1] + 1)
        finite = np.where(np.isfinite(c), c, np.nan)
        med = np.nanmedian(finite, axis=0)
        ax.plot(x, med, label=f"{sampler} (median of {c.shape[0]} seeds)")
        ax.fill_between(x, np.nanmin(finite, axis=0), np.nanmax(finite, axis=0), alpha=0.2)
    ax.set_xlabel("trial")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
