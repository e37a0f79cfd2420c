"""Samplers compared on equal budgets and seeds.

For each sampler: median and spread (min..max over seeds) of the best
validation objective after 25 %, 50 % and 100 % of the budget, the test
metric of the best configuration (chosen on validation; test computed
afterwards), wall time and failed trials; plus a best-so-far plot with a band
over seeds.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.atomic import write_json_atomic, write_text_atomic
from ..core.choices import check_n_trials
from ..core.errors import TopoCAMError
from ..core.pipeline import baseline
from ..core.stats import format_mean_sd, mean_sd
from .plots import comparison_plot
from .runner import SamplerRun, StudyRunner
from .samplers import check_samplers

FRACTIONS = (0.25, 0.5, 1.0)


@dataclass
class Comparison:
    rows: list[dict]
    runs: list[SamplerRun]
    files: dict[str, Path]
    replication: dict | None = None
    base_runs: list[SamplerRun] = field(default_factory=list)  # the tuned Topo-Original searches


def _stat(values: list[float]) -> dict[str, float]:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def _fmt(s: dict[str, float]) -> str:
    if not math.isfinite(s["median"]):
        return "—"
    return f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"


def summarise(runs: list[SamplerRun], n_trials: int, metric: str, objective: str | None = None) -> tuple[list[dict], dict[str, np.ndarray]]:
    objective = objective or f"val_{metric}"
    rows, curves = [], {}
    for sampler in dict.fromkeys(r.sampler for r in runs):
        mine = [r for r in runs if r.sampler == sampler]
        curve = np.full((len(mine), n_trials), -np.inf)
        for i, r in enumerate(mine):
            b = r.best_so_far()[:n_trials]
            curve[i, : b.size] = b
            if b.size < n_trials and b.size:
                curve[i, b.size :] = b[-1]
        curves[sampler] = curve
        row = {"sampler": sampler, "seeds": [r.seed for r in mine], "n_trials": n_trials}
        for f in FRACTIONS:
            k = max(1, math.ceil(f * n_trials))
            row[f"best_{objective}@{int(f * 100)}%"] = _stat([float(c[k - 1]) if np.isfinite(c[k - 1]) else float("nan") for c in curve])
        row[f"test_{metric}_of_best"] = _stat([(r.test or {}).get(metric, float("nan")) for r in mine])
        row["wall_s"] = _stat([float(np.nansum(r.durations_s)) for r in mine])
        row["s_per_trial"] = _stat([float(np.nanmean(r.durations_s)) if r.durations_s else float("nan") for r in mine])
        row["failed_trials"] = int(sum(r.n_failed for r in mine))
        rows.append(row)
    return rows, curves


ALPHA = 0.05


def _wilcoxon(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples (1.0 when every pair is equal)."""
    from scipy.stats import wilcoxon

    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    if d.size < 2 or not np.any(d != 0):
        return 1.0
    return float(wilcoxon(a[ok], b[ok], zero_method="zsplit", alternative="two-sided").pvalue)


def sampler_statistics(rows: list[dict], curves: dict[str, np.ndarray], runs: list[SamplerRun], n_trials: int, metric: str) -> str:
    """Adds ``mean_rank`` (at 25/50/100 % of the budget; 1 = best, ties averaged, seeds
    paired) and ``p_vs_random`` (Wilcoxon signed-rank over seeds of the best objective at
    100 % of the budget; ``p_vs_random_test``: of the chosen configuration's test metric)
    to each row; returns a sentence that says what is and is not significant."""
    from scipy.stats import rankdata

    samplers = [r["sampler"] for r in rows]
    n_seeds = min(c.shape[0] for c in curves.values())
    for f in FRACTIONS:
        k = max(1, math.ceil(f * n_trials))
        values = np.array([curves[s][:n_seeds, k - 1] for s in samplers])  # (samplers, seeds)
        ranks = rankdata(-values, axis=0)
        for row, r in zip(rows, ranks):
            row.setdefault("mean_rank", {})[f"{int(f * 100)}%"] = float(r.mean())
    if "random" not in samplers or n_seeds < 2:
        return "No significance test: it needs random search in the comparison and at least 2 seeds.\n"
    test = {s: np.array([(r.test or {}).get(metric, np.nan) for r in runs if r.sampler == s][:n_seeds], dtype=float) for s in samplers}
    significant = []
    for row in rows:
        s = row["sampler"]
        if s == "random":
            row["p_vs_random"] = row["p_vs_random_test"] = None
            continue
        row["p_vs_random"] = _wilcoxon(curves[s][:n_seeds, -1], curves["random"][:n_seeds, -1])
        row["p_vs_random_test"] = _wilcoxon(test[s], test["random"])
        if row["p_vs_random"] < ALPHA:
            significant.append(f"{s} (p = {row['p_vs_random']:.3f})")
    floor = 2.0 / 2**n_seeds
    text = (f"\nStatistics over {n_seeds} paired seeds: mean rank (1 = best) at 25/50/100 % of the budget; "
            f"p_vs_random: two-sided Wilcoxon signed-rank test against random search of the best objective at 100 %.\n")
    if significant:
        text += f"Significantly different from random search at alpha = {ALPHA}: {', '.join(significant)}.\n"
    else:
        text += (f"No sampler differs significantly from random search at alpha = {ALPHA}"
                 + (f" (with {n_seeds} seeds the smallest attainable p is {floor:.3f}: use more seeds)" if floor >= ALPHA else "")
                 + ".\n")
    return text


def failures_text(runs: list[SamplerRun]) -> str:
    """Failed trials grouped by error message over all (sampler, seed) runs, with the
    parameter values every trial of the group shares."""
    groups: dict[str, dict] = {}
    for r in runs:
        for g in r.failures:
            e = groups.setdefault(g["error"], {"count": 0, "where": [], "shared": None})
            e["count"] += g["count"]
            e["where"].append(f"{r.sampler}.s{r.seed}")
            params = g["shared_params"] if g["count"] > 1 else {}
            e["shared"] = params if e["shared"] is None else {k: v for k, v in e["shared"].items() if params.get(k) == v}
    if not groups:
        return ""
    lines = ["", "Failed trials, grouped by error:"]
    for msg, e in sorted(groups.items(), key=lambda kv: -kv[1]["count"]):
        shared = f"; all with {e['shared']}" if e["shared"] else ""
        lines.append(f"- {e['count']} trial(s) in {', '.join(e['where'])}{shared}: {msg}")
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict], metric: str, replication: dict | None = None, objective: str | None = None) -> str:
    objective = objective or f"val_{metric}"
    cols = [f"best_{objective}@25%", f"best_{objective}@50%", f"best_{objective}@100%", f"test_{metric}_of_best", "wall_s", "s_per_trial"]
    rep = f"test_{metric}_replicated"
    stats = "mean_rank" in rows[0]
    head = ["sampler", *cols, *([rep] if replication else []), *(["mean rank 25/50/100%", "p vs random"] if stats else []), "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        extra = []
        if stats:
            p = r.get("p_vs_random")
            extra = ["/".join(f"{v:.2f}" for v in r["mean_rank"].values()), "—" if p is None else f"{p:.3f}"]
        cells = [r["sampler"], *[_fmt(r[c]) for c in cols], *([format_mean_sd(r.get(rep), with_n=True)] if replication else []), *extra, str(r["failed_trials"])]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\nCells: median [min, max] over seeds. wall_s: the trials' start-to-finish seconds summed per (sampler, seed), the sampler's own work included; s_per_trial: their mean.\n"
    if replication:
        seeds = replication["seeds"]
        base = replication["baselines"]
        text += (
            f"\n{rep}: each (sampler, seed)'s best configuration re-trained and tested under model seeds {seeds} "
            f"(backbone and MLP), mean ± sd over all of them. Baselines under the same seeds: "
            f"CNN {format_mean_sd(base['cnn'], with_n=True)}, Topo-Original (base configuration) {format_mean_sd(base['topo_original'], with_n=True)}.\n"
        )
        if replication["degenerate_seeds"]:
            text += f"\nWARNING: the backbone of model seed(s) {replication['degenerate_seeds']} predicts one class on validation.\n"
    return text


def replicate(runner: StudyRunner, runs: list[SamplerRun], rows: list[dict], seeds: list[int], baselines: bool = True) -> dict:
    """Re-evaluate each (sampler, seed)'s best configuration under every replication
    seed, after all searches are over; adds ``test_<metric>_replicated`` to the rows
    (and the CNN and untuned Topo-Original under the same seeds, if ``baselines``)."""
    metric = runner.spec.metric
    per_run: dict[str, dict] = {}
    for r in runs:
        if r.best_trial < 0:
            continue
        params = {**{k: p.value for k, p in runner.spec.space.items() if p.kind == "fixed"}, **r.best_params}
        per_run[f"{r.sampler}.s{r.seed}"] = runner.replicate(params, seeds)
    for row in rows:
        values = [res["test"][metric] for key, reps in per_run.items() if key.rsplit(".s", 1)[0] == row["sampler"]
                  for res in reps.values()]
        row[f"test_{metric}_replicated"] = mean_sd(values)
    base = runner.replicate_baselines(seeds) if baselines else {}
    degenerate = sorted({s for reps in per_run.values() for s, res in reps.items() if res["degenerate_backbone"]})
    return {
        "seeds": seeds, "per_run": per_run, "degenerate_seeds": degenerate,
        "baselines": {name: mean_sd([m[metric] for m in by_seed.values()]) for name, by_seed in base.items()},
        "baselines_per_seed": base,
    }


def equal_budget_table(rows: list[dict], base_rows: list[dict], runs: list[SamplerRun], base_runs: list[SamplerRun],
                       metric: str, replication: dict | None, cnn: dict[str, float]) -> tuple[str, list[dict]]:
    """CNN, tuned Topo-Original and tuned TopoCAM side by side on test, per sampler: each
    method's best configuration under the same sampler, budget, seeds and MLP search.
    Cells: mean ± sd over the replication seeds (all (sampler seed, model seed) pairs),
    or over the sampler seeds' chosen configurations when there is no replication."""
    key = f"test_{metric}_replicated" if replication else None

    def cell(row: dict, of: list[SamplerRun]) -> dict[str, float]:
        if key:
            return row[key]
        return mean_sd([(r.test or {}).get(metric, float("nan")) for r in of if r.sampler == row["sampler"]])

    by_sampler = {r["sampler"]: r for r in base_rows}
    out, lines = [], [
        f"| sampler | CNN test {metric.upper()} | Topo-Original (tuned) | TopoCAM (tuned) |", "|---|---|---|---|",
    ]
    for r in rows:
        b = by_sampler.get(r["sampler"])
        entry = {"sampler": r["sampler"], "cnn": cnn, "topo_original": cell(b, base_runs) if b else None, "topocam": cell(r, runs)}
        out.append(entry)
        lines.append(f"| {r['sampler']} | " + " | ".join(format_mean_sd(v, with_n=True) for v in (cnn, entry["topo_original"], entry["topocam"])) + " |")
    how = (f"model seeds {replication['seeds']}" if replication else "the sampler seeds' chosen configurations (one backbone)")
    text = ("\n## Equal budgets: CNN vs tuned Topo-Original vs tuned TopoCAM (test)\n\n" + "\n".join(lines)
            + f"\n\nTopo-Original (Betti curves of the whole image) is searched with the same sampler, budget, seeds "
            f"and MLP space as TopoCAM (no fusion weights, tau or CAM). Cells: mean ± sd over {how}.\n")
    return text, out


def compare(runner: StudyRunner, samplers: list[str], seeds: list[int], n_trials: int, out_dir: Path) -> Comparison:
    spec = runner.spec
    samplers, seeds = list(dict.fromkeys(samplers)), list(dict.fromkeys(seeds))  # a repeated name would count twice
    check_samplers(samplers, "compare")
    check_n_trials(n_trials)
    if not seeds:
        raise TopoCAMError("compare needs one or more seeds")
    arms = ("topocam", "topo_original") if spec.tune_topo_original else ("topocam",)
    for arm in arms:  # objective, definitions and data of every search checked before anything trains
        for s in samplers:
            for seed in seeds:
                runner.preflight(s, seed, arm)
    runner.log_baselines()
    runs = [runner.run(s, seed, n_trials) for s in samplers for seed in seeds]
    rows, curves = summarise(runs, n_trials, spec.metric, spec.objective)
    replication = replicate(runner, runs, rows, list(spec.replicate_seeds)) if spec.replicate_seeds else None
    verdict = sampler_statistics(rows, curves, runs, n_trials, spec.metric)
    base_runs: list[SamplerRun] = []
    base_rows: list[dict] = []
    base_replication = None
    if spec.tune_topo_original:  # the baseline gets the same sampler, budget, seeds and MLP search
        arm = runner.for_arm("topo_original")
        base_runs = [arm.run(s, seed, n_trials) for s in samplers for seed in seeds]
        base_rows, _ = summarise(base_runs, n_trials, spec.metric, spec.objective)
        if spec.replicate_seeds:
            base_replication = replicate(arm, base_runs, base_rows, list(spec.replicate_seeds), baselines=False)
    ctx = runner.ctx
    cnn = {"mean": float(baseline(ctx, spec.base, "cnn").test[spec.metric]), "sd": 0.0, "n": 1}
    if replication is not None:
        cnn = replication["baselines"]["cnn"]
    equal_md, equal = equal_budget_table(rows, base_rows, runs, base_runs, spec.metric, replication, cnn) if base_rows else ("", [])
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "table_md": out_dir / "comparison.md",
        "table_csv": out_dir / "comparison.csv",
        "json": out_dir / "comparison.json",
        "plot": out_dir / "best_so_far.png",
    }
    md = f"# {spec.name}: samplers on {n_trials} trials, seeds {list(seeds)}\n\n" + markdown_table(rows, spec.metric, replication, spec.objective) + verdict + equal_md + failures_text(runs + base_runs)
    write_text_atomic(files["table_md"], md)
    flat = []
    for r in rows:
        d = {"sampler": r["sampler"], "failed_trials": r["failed_trials"]}
        for k, v in r.items():
            if k == "mean_rank":
                d.update({f"mean_rank@{pct}": rank for pct, rank in v.items()})
            elif k.startswith("p_vs_random"):
                d[k] = v
            elif isinstance(v, dict):
                d.update({f"{k}_{s}": v[s] for s in ("median", "min", "max", "mean", "sd", "n") if s in v})
        flat.append(d)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for d in flat for k in d)))
    w.writeheader()
    w.writerows(flat)
    write_text_atomic(files["table_csv"], buf.getvalue())
    detail = {
        "study": spec.name, "objective": spec.objective, "n_trials": n_trials, "seeds": list(seeds), "rows": rows,
        "replication": replication,
        "equal_budget": {"rows": equal, "topo_original_rows": base_rows, "topo_original_replication": base_replication},
        "runs": [{"sampler": r.sampler, "seed": r.seed, "best_value": r.best_value, "best_trial": r.best_trial,
                  "best_params": r.best_params, "val": r.val, "test": r.test, "values": r.values,
                  "trial_numbers": r.numbers, "n_failed": r.n_failed, "failures": r.failures,
                  "durations_s": r.durations_s} for r in runs],
    }
    write_json_atomic(files["json"], detail)  # strict JSON: NaN as null
    comparison_plot(curves, files["plot"], f"{spec.name}: best-so-far {spec.objective}", f"best {spec.objective}")
    if runner.tracker is not None:
        t = runner.tracker
        rid = t.start_run(runner.experiment, f"comparison-{n_trials}trials", runner.runs.tags(kind="comparison"),
                          params={"samplers": ",".join(samplers), "seeds": ",".join(map(str, seeds)), "n_trials": n_trials})
        for r in rows:
            t.log_metrics(rid, {f"{r['sampler']}_{k}_{stat}": v[stat] for k, v in r.items() if isinstance(v, dict)
                                for stat in ("median", "mean", "sd") if stat in v})
            t.log_metrics(rid, {**{f"{r['sampler']}_mean_rank@{pct}": v for pct, v in r.get("mean_rank", {}).items()},
                                **{f"{r['sampler']}_{k}": r[k] for k in ("p_vs_random", "p_vs_random_test") if r.get(k) is not None}})
        if replication is not None:
            for name, st in replication["baselines"].items():
                t.log_metrics(rid, {f"{name}_test_{spec.metric}_replicated_mean": st["mean"],
                                    f"{name}_test_{spec.metric}_replicated_sd": st["sd"]})
            t.set_tags(rid, {"replicate_seeds": ",".join(map(str, replication["seeds"])),
                             "degenerate_backbone": str(bool(replication["degenerate_seeds"])).lower()})
            for r in runs:
                reps = replication["per_run"].get(f"{r.sampler}.s{r.seed}")
                if reps and r.run_id:
                    st = mean_sd([res["test"][spec.metric] for res in reps.values()])
                    t.log_metrics(r.run_id, {f"replicated_test_{spec.metric}_mean": st["mean"],
                                             f"replicated_test_{spec.metric}_sd": st["sd"]})
        for p in files.values():
            t.log_artifact(rid, p, "comparison")
        t.log_text(rid, spec.text, f"study/{spec.path.name}")
        t.finish(rid)
    return Comparison(rows, runs, files, replication, base_runs)
