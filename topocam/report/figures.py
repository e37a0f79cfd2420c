"""The report's figures, in explain's style (:mod:`topocam.tracking.figures`: a bare
``Figure`` on Agg, its palette and titles). Samplers differ in colour, line style and
marker, so they stay apart in grey print."""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.figure import Figure

from ..tracking.figures import class_colour, suptitle

DPI = 110
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def sampler_style(i: int) -> dict:
    return {"color": class_colour(i), "linestyle": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)]}


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def best_so_far_figure(curves: dict[str, np.ndarray], title: str, ylabel: str) -> Figure:
    """Median best-so-far over sampler seeds, a band from the 25th to the 75th percentile."""
    fig = Figure(figsize=(8, 4.6))
    ax = fig.subplots()
    for i, (s, c) in enumerate(curves.items()):
        c = np.where(np.isfinite(c), c, np.nan)
        x = np.arange(1, c.shape[1] + 1)
        st = sampler_style(i)
        med = np.nanmedian(c, axis=0)
        ax.plot(x, med, label=f"{s} (n={c.shape[0]})", color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                markevery=max(1, c.shape[1] // 8), markersize=5, linewidth=1.6)
        ax.fill_between(x, np.nanpercentile(c, 25, axis=0), np.nanpercentile(c, 75, axis=0), color=st["color"], alpha=0.12)
    ax.set_xlabel("trial")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    suptitle(fig, title)
    return fig


def mean_rank_figure(ranks: dict[str, np.ndarray], title: str) -> Figure:
    """Mean rank (1 = best) over the (study, seed) blocks at every trial of the budget."""
    fig = Figure(figsize=(8, 3.8))
    ax = fig.subplots()
    for i, (s, r) in enumerate(ranks.items()):
        st = sampler_style(i)
        ax.plot(np.arange(1, r.size + 1), r, label=s, color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                markevery=max(1, r.size // 8), markersize=5, linewidth=1.6)
    ax.invert_yaxis()
    ax.set_xlabel("trial")
    ax.set_ylabel("mean rank (1 = best)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: the lines fill them
    suptitle(fig, title)
    return fig


def cd_figure(test, title: str) -> Figure:
    """Demšar's critical-difference diagram: samplers on the mean-rank axis, a bar joining the
    groups whose mean ranks lie within one critical difference, the CD drawn at the top."""
    k = len(test.samplers)
    order = np.argsort(test.mean_ranks)
    names = [test.samplers[i] for i in order]
    ranks = [test.mean_ranks[i] for i in order]
    fig = Figure(figsize=(8, 1.4 + 0.3 * k))
    ax = fig.subplots()
    fig.subplots_adjust(top=0.8)
    ax.set_xlim(1 - 0.2, k + 0.2)
    ax.set_ylim(0.1, 1.08)
    ax.axis("off")
    y_axis = 0.82
    ax.plot([1, k], [y_axis, y_axis], color="black", linewidth=1)
    for t in range(1, k + 1):
        ax.plot([t, t], [y_axis, y_axis + 0.03], color="black", linewidth=1)
        ax.text(t, y_axis + 0.05, str(t), ha="center", va="bottom", fontsize=9)
    cd = test.cd
    if math.isfinite(cd):
        ax.plot([1, min(k, 1 + cd)], [0.97, 0.97], color="black", linewidth=2)
        ax.text(min(k, 1 + cd) + 0.08, 0.97, f"CD = {cd:.2f}", ha="left", va="center", fontsize=8)
    half = (k + 1) // 2
    step = 0.55 / max(1, half)
    for j, (n, r) in enumerate(zip(names, ranks)):
        left = j < half
        y = y_axis - 0.08 - step * (j if left else k - 1 - j)
        x_text = 1 - 0.15 if left else k + 0.15
        ax.plot([r, r, x_text], [y_axis, y, y], color="0.3", linewidth=0.9)
        ax.text(x_text, y, f"{n} ({r:.2f})", ha="right" if left else "left", va="center", fontsize=9)
    # cliques: maximal runs of samplers whose ranks are within CD of each other
    cliques = []
    for a in range(k):
        b = a
        while b + 1 < k and ranks[b + 1] - ranks[a] <= cd:
            b += 1
        if b > a and not any(c0 <= a and b <= c1 for c0, c1 in cliques):
            cliques.append((a, b))
    for i, (a, b) in enumerate(cliques):
        yy = y_axis - 0.04 - 0.035 * i
        ax.plot([ranks[a] - 0.03, ranks[b] + 0.03], [yy, yy], color="black", linewidth=3, solid_capstyle="round")
    suptitle(fig, title, fontsize=10)
    return fig


def forest_figure(rows: list[dict], metric: str, title: str) -> Figure:
    """Each arm's Δ (arm − reference) with its paired 95 % interval; filled markers where the interval
    excludes 0; leakage-audit arms below a rule, in grey, labelled INVALID."""
    honest = [r for r in rows if r["ablation"] != "reference" and r.get(f"delta_{metric}") and not r["leakage_audit"]]
    audit = [r for r in rows if r.get(f"delta_{metric}") and r["leakage_audit"]]
    items = honest + audit
    fig = Figure(figsize=(8, 1.2 + 0.3 * max(1, len(items))))
    ax = fig.subplots()
    for i, r in enumerate(items):
        d = r[f"delta_{metric}"]
        lo, hi = d["ci95"]
        y = len(items) - 1 - i
        bad = r["leakage_audit"]
        colour = "0.55" if bad else ("#d62728" if d["excludes_zero"] else "#1f77b4")
        ax.plot([lo, hi], [y, y], color=colour, linewidth=1.6)
        ax.plot([d["mean"]], [y], marker="D" if bad else "o", markersize=6, color=colour,
                markerfacecolor=colour if d["excludes_zero"] else "white")
    labels = [f"{r['ablation']}={r['arm']}" + ("  INVALID" if r["leakage_audit"] else "") + (" *" if r[f"delta_{metric}"]["excludes_zero"] else "")
              for r in items]
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels(labels[::-1], fontsize=8)
    if audit and honest:
        ax.axhline(len(audit) - 0.5, color="black", linewidth=0.8, linestyle="--")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"Δ test {metric.upper()} vs reference (paired 95 % interval; * and filled: excludes 0)")
    ax.grid(axis="x", alpha=0.3)
    suptitle(fig, title, fontsize=10)
    return fig


def importance_figure(importances: dict[str, float], title: str) -> Figure:
    names = list(importances)[::-1]
    fig = Figure(figsize=(6.5, 0.9 + 0.3 * max(1, len(names))))
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names], color="0.45", edgecolor="black", linewidth=0.5)
    ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    suptitle(fig, title, fontsize=10)
    return fig


def slice_figure(trials: list[dict], params: list[str], objective: str, title: str) -> Figure:
    """The objective of every completed trial against each parameter, one panel each; samplers as markers."""
    n = len(params)
    fig = Figure(figsize=(min(12, 3.2 * n), 3.3))
    axes = np.atleast_1d(fig.subplots(1, n, sharey=True))
    samplers = list(dict.fromkeys(t["sampler"] for t in trials))
    for ax, p in zip(axes, params):
        for i, s in enumerate(samplers):
            mine = [t for t in trials if t["sampler"] == s and p in t["params"]]
            st = sampler_style(i)
            ax.scatter([t["params"][p] for t in mine], [t["value"] for t in mine], s=14, marker=st["marker"],
                       facecolors="none" if i % 2 else st["color"], edgecolors=st["color"], linewidths=0.8, label=s)
        ax.set_xlabel(p)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(objective)
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.subplots_adjust(bottom=0.3)
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=max(1, len(labels)), bbox_to_anchor=(0.5, 0.0))
    suptitle(fig, title, fontsize=10)
    return fig
