"""``topocam report``: one page over studies, comparisons and ablations, from what is stored.

Sections: the headline (CNN, tuned Topo-Original, tuned TopoCAM and the hybrid head on test,
beside published numbers, with a verdict from the paired interval), the sampler comparison
(best-so-far curves, mean ranks, a Friedman test with Nemenyi's critical difference), the
ablations (forest plots, the paper's claims), what the search learned (fANOVA importances,
slices, the logged figures of the best configuration) and provenance. Nothing is trained.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from ..core.atomic import write_text_atomic
from ..core.errors import TopoCAMError
from ..core.stats import format_mean_sd
from ..stores import redact_url
from . import figures as F
from .cd import ALPHA, blocks_needed, friedman_nemenyi, verdict
from .gather import (
    METHOD_LABELS,
    METHODS,
    StudyData,
    claims_for,
    curves,
    gather,
    load_references,
    references_for,
)
from .render import (
    FORMATS,
    Image,
    Missing,
    Section,
    Table,
    num,
    to_html,
    to_latex,
    to_markdown,
)

SLICE_PARAMS = ("tau", "w_layer2", "w_layer3", "w_layer4")
IMPORTANCE = "fANOVA (optuna.importance.FanovaImportanceEvaluator, seed 0)"
PACKAGES = ("topocam", "optuna", "mlflow", "numpy", "scipy", "scikit-learn", "matplotlib", "torch")


@dataclass
class ReportResult:
    files: dict[str, Path]
    run_id: str | None
    studies: list[StudyData]


def _ci(st: dict | None) -> str:
    if not st or "ci95" not in st:
        return ""
    lo, hi = st["ci95"]
    return f"\n[{num(lo)}, {num(hi)}]" if lo is not None and math.isfinite(lo) else ""


def cell_text(cell) -> str:
    if cell is None:
        return "—"
    lines = [f"{m.upper()} {format_mean_sd(cell.metrics.get(m))}{_ci(cell.metrics.get(m))}" for m in ("auc", "acc")]
    n = (cell.metrics.get("auc") or {}).get("n")
    return "\n".join(lines + ([f"n={n}"] if n else []))


def _interval(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{d['mean']:+.3f} [{num(lo)}, {num(hi)}]"


# ---------------------------------------------------------------- 1. headline


def headline_section(studies: list[StudyData], refs: list[dict], suite: str) -> Section:
    s = Section("headline", "1. Headline: test AUC and ACC per study")
    rows = []
    for d in studies:
        h = d.headline
        b = d.spec.base
        label = f"{d.name}\n{b.dataset}, {b.size} px"
        if h is None:
            rows.append([label, *(["—"] * len(METHODS)), "—", "—", "—"])
            continue
        cells = [cell_text(h.cells.get(m)) for m in METHODS]
        mine = references_for(refs, b.dataset)
        paper = [r for r in mine if r.get("source", "").lower().startswith("topocam")]
        bench = [r for r in mine if not r.get("source", "").lower().startswith("topocam")]

        def refcell(rs):
            if not rs:
                return "— (not in the reference file)"
            where = {(r["source"], r["table"], int(r["size"])) for r in rs}
            lines = [f"{r['model']}: AUC {num(r.get('auc'))}, ACC {num(r.get('acc'))}" for r in rs]
            for src, table, size in sorted(where):
                lines.append(f"({src}, {table}; at {size} px{'' if size == int(b.size) else f', ours at {b.size}'})")
            return "\n".join(lines)

        words = []
        for other in ("cnn", "topo_original"):
            diff = h.differences.get(other)
            if diff:
                words.append(f"vs {METHOD_LABELS[other]}: {verdict(diff['ci95'])} (Δ {d.metric.upper()} {_interval(diff)})")
            elif other in h.cells or h.source == "comparison":
                words.append(f"vs {METHOD_LABELS[other]}: no paired interval")
        rows.append([label, *cells, refcell(paper), refcell(bench), "\n".join(words) or "—"])
    s.blocks.append(Table(["study", "CNN", "Topo-Original (tuned)", "TopoCAM (tuned)", "Hybrid head", "paper (TopoCAM Tables 2–3)",
                           "MedMNIST v2 benchmark", "verdict: TopoCAM beats …"], rows, id="headline", caption=(
        "Cells: test metric mean ± sd over model seeds [bootstrap 95 % interval of the seed-mean], n seeds. "
        "Verdict from the paired bootstrap interval of TopoCAM − other on the same test images (the ablation's Δ): "
        "supported when it lies above 0, reversed when below 0, not supported when it includes 0. Published numbers from "
        "topocam/report/references.toml, with the input size they were measured at; each with its source and table.")))
    for d in studies:
        h = d.headline
        if h is None:
            s.blocks.append(Missing(f"{d.name}: no comparison or ablation tables",
                                    " && ".join(c for c in (d.missing.get("comparison"), d.missing.get("ablation")) if c)))
        elif h.source == "comparison":
            s.blocks.append(Missing(f"{d.name}: no paired intervals (the numbers are the comparison's replication, pooled "
                                    f"over samplers; the hybrid head and the intervals come from the ablation suite)",
                                    d.missing.get("ablation", f"topocam ablate {d.spec.path} --suite {suite}")))
        else:
            for m in METHODS:
                c = h.cells.get(m)
                if c is not None and c.note:
                    s.p(f"{d.name}, {METHOD_LABELS[m]}: {c.note}.")
    return s


# ---------------------------------------------------------------- 2. samplers


def _ranks_over_budget(blocks: list[dict[str, np.ndarray]], samplers: list[str]) -> dict[str, np.ndarray]:
    from scipy.stats import rankdata

    n = min(min(b[s].size for s in samplers) for b in blocks)
    v = np.array([[b[s][:n] for s in samplers] for b in blocks])  # (blocks, samplers, trials)
    r = rankdata(-np.where(np.isfinite(v), v, -1e300), axis=1)
    return {s: r[:, i, :].mean(axis=0) for i, s in enumerate(samplers)}


def sampler_section(studies: list[StudyData]) -> Section:
    s = Section("samplers", "2. Sampler comparison")
    have = [d for d in studies if d.comparison is not None]
    for d in studies:
        if d.comparison is None:
            s.blocks.append(Missing(f"{d.name}: no comparison", d.missing["comparison"]))
    if not have:
        return s
    blocks: list[dict[str, np.ndarray]] = []
    common = None
    for d in have:
        c = curves(d.comparison)
        obj = d.comparison.get("objective", d.spec.objective)
        s.h(f"{d.name}: best-so-far {obj}")
        s.blocks.append(Image(f"best_so_far_{d.name}", F.png(F.best_so_far_figure(
            c, f"{d.name}: best-so-far {obj} (validation), median over sampler seeds, 25th–75th percentile band", f"best {obj}")),
            f"{d.name}: best-so-far curves"))
        rows = []
        for r in d.comparison["rows"]:
            p = r.get("p_vs_random")
            ranks = r.get("mean_rank", {})
            best = r.get(f"best_{obj}@100%", {})
            rows.append([r["sampler"], str(len(r["seeds"])), num(best.get("median")),
                         " / ".join(f"{v:.2f}" for v in ranks.values()) or "—", "—" if p is None else num(p),
                         "—" if r.get("p_vs_random_test") is None else num(r["p_vs_random_test"])])
        s.blocks.append(Table(["sampler", "seeds", f"best {obj} @100 % (median)", "mean rank @25/50/100 %", "p vs random",
                               "p vs random (test of the choice)"], rows, caption=(
            "From comparison.json (topocam study compare): mean rank 1 = best, seeds paired; p: two-sided Wilcoxon "
            "signed-rank test over sampler seeds against random search.")))
        seeds = None
        for arr in c.values():
            seeds = arr.shape[0] if seeds is None else min(seeds, arr.shape[0])
        common = set(c) if common is None else common & set(c)
        for i in range(seeds or 0):
            blocks.append({k: v[i] for k, v in c.items()})
    samplers = [x for x in (have[0].comparison["rows"] and [r["sampler"] for r in have[0].comparison["rows"]]) if x in (common or set())]
    blocks = [b for b in blocks if all(x in b for x in samplers)]
    s.h("Over every (study × sampler seed) block")
    if len(samplers) < 2 or len(blocks) < 2:
        s.p(f"No rank test: it needs at least 2 samplers common to every comparison and 2 blocks (have {len(samplers)} and {len(blocks)}).")
        return s
    ranks = _ranks_over_budget(blocks, samplers)
    s.blocks.append(Image("mean_rank", F.png(F.mean_rank_figure(ranks, f"mean rank over {len(blocks)} (study × seed) blocks at every trial")),
                          "mean rank over the budget"))
    final = np.array([[b[x][-1] for x in samplers] for b in blocks])
    test = friedman_nemenyi(final, samplers)
    s.blocks.append(Image("cd_diagram", F.png(F.cd_figure(test, (
        f"Critical difference (Nemenyi, α = {ALPHA}) of the mean rank of the best objective at the full budget; "
        f"{len(blocks)} blocks, Friedman p = {test.p_value:.3f}"))), "critical-difference diagram"))
    s.blocks.append(Table(["sampler", "mean rank (1 = best)"], [[x, f"{r:.2f}"] for x, r in zip(test.samplers, test.mean_ranks)],
                          id="ranks", caption=f"Friedman χ² = {test.statistic:.3f}, p = {test.p_value:.3f}; Nemenyi CD = {test.cd:.3f} "
                                              f"(q = {test.q_alpha:.3f}, k = {len(samplers)}, N = {test.n_blocks})."))
    gap = max(test.mean_ranks) - min(test.mean_ranks)
    pairs = [(a, b) for i, a in enumerate(samplers) for b in samplers[i + 1:] if test.differs(a, b)]
    need = blocks_needed(len(samplers), gap)
    if test.p_value < ALPHA and pairs:
        sentence = (f"The samplers' ranks differ (Friedman p = {test.p_value:.3f}); by Nemenyi's rule "
                    + ", ".join(f"{a} and {b}" for a, b in pairs) + " differ.")
    else:
        sentence = (f"No difference between samplers is significant at α = {ALPHA} (Friedman p = {test.p_value:.3f}; the largest "
                    f"mean-rank gap, {gap:.2f}, is {'within' if gap <= test.cd else 'beyond'} the critical difference {test.cd:.2f}).")
    if need is not None and not pairs:
        sentence += (f" Rule: a gap g exceeds the critical difference once N > q² k (k+1) / (6 g²); if the largest gap held at "
                     f"{gap:.2f}, that needs {need} (study × seed) blocks, about {math.ceil(need / len(have))} sampler seeds per study "
                     f"over {len(have)} stud{'y' if len(have) == 1 else 'ies'} (now {len(blocks)} blocks).")
    s.p(sentence)
    return s


# ---------------------------------------------------------------- 3. ablations


CLAIMS = (
    # claim, the paper's table, the arms TopoCAM (the reference) should beat
    ("TopoCAM beats the CNN", "Tables 2–3", ["baselines=cnn"]),
    ("TopoCAM beats Topo-Original", "Tables 2–3", ["baselines=topo_original"]),
    ("the fused CAM layers beat each single layer", "Table 5", ["layers=layer2", "layers=layer3", "layers=layer4"]),
    ("the chosen τ beats the other thresholds", "Table 4", ["tau=0.4", "tau=0.5", "tau=0.6", "tau=0.7", "tau=0.8"]),
    ("the chosen CAM generator beats the others", "Table 7", ["cam=gradcam", "cam=gradcampp", "cam=scorecam"]),
)


def claim_verdict(rows: dict[str, dict], arms: list[str], metric: str) -> tuple[str, str]:
    """Ours (each arm's TopoCAM − arm, paired) and the verdict: supported when every interval lies
    above 0, reversed when any lies below 0, not supported otherwise."""
    parts, words = [], []
    for key in arms:
        r = rows.get(key)
        d = r.get(f"delta_{metric}") if r and r.get("status") == "ok" else None
        if not d or not d.get("n"):
            parts.append(f"{key}: not run")
            words.append(None)
            continue
        lo, hi = d["ci95"]
        if d["mean"] == 0 and lo == 0 and hi == 0:  # the arm is the reference's own setting
            parts.append(f"{key}: the reference's own setting")
            continue
        iv = [-hi, -lo]
        parts.append(f"{key}: {-d['mean']:+.3f} [{num(iv[0])}, {num(iv[1])}]")
        words.append(verdict(iv))
    got = [w for w in words if w is not None]
    if not got:
        return "\n".join(parts), "not run"
    if "reversed" in got:
        v = "reversed"
    elif all(w == "supported" for w in got) and len(got) == len(words):
        v = "supported"
    else:
        v = "not supported"
    return "\n".join(parts), v


def ablation_section(studies: list[StudyData], suite: str, refs: list[dict]) -> Section:
    s = Section("ablations", f"3. Ablations (suite {suite!r})")
    for d in studies:
        ab = d.ablations.get(suite)
        if ab is None:
            s.blocks.append(Missing(f"{d.name}: no ablation suite {suite!r}", d.missing["ablation"]))
            continue
        metric = d.metric
        s.h(f"{d.name}: Δ test {metric.upper()} of each arm to the reference")
        s.p(f"Reference: TopoCAM at {ab['reference']['source']}; model seeds {ab['seeds']}, {ab.get('n_test', '?')} test images.")
        s.blocks.append(Image(f"forest_{d.name}", F.png(F.forest_figure(ab["rows"], metric, (
            f"{d.name}, suite {suite}: arm − reference on test, paired bootstrap 95 % interval; leakage-audit arms (grey, "
            f"below the dashed line) are INVALID"))), f"{d.name}: forest plot"))
        rows = {f"{r['ablation']}={r['arm']}": r for r in ab["rows"]}
        table = []
        paper = claims_for(refs, d.spec.base.dataset)
        for claim, where, arms in CLAIMS:
            ours, v = claim_verdict(rows, arms, metric)
            p = paper.get(claim)
            table.append([claim, f"{p['value']}\n({p['source']})" if p else f"— (not in the reference file; paper {where})", ours, v])
        s.blocks.append(Table(["claim", "paper number", f"ours: TopoCAM − arm, Δ test {metric.upper()} [paired 95 % CI]", "verdict"],
                              table, id=f"claims_{d.name}", caption=(
            "Verdict: supported when every interval lies above 0, reversed when any lies below 0, not supported otherwise. "
            "Arms are compared at the reference's tuned settings.")))
        bad = [r for r in ab["rows"] if r["leakage_audit"] and r.get(f"delta_{metric}")]
        if bad:
            s.p("INVALID (leakage audit, the reference implementation's shortcuts): " + "; ".join(
                f"{r['arm']} {_interval(r[f'delta_{metric}'])}" for r in bad) + ". These numbers are the inflation such code reports, never a result.")
    return s


# ---------------------------------------------------------------- 4. search


def importances(trials: list[dict]) -> dict[str, float]:
    import optuna

    from ..search.storage import quiet_experimental

    study = optuna.create_study(direction="maximize")
    keys = set.intersection(*(set(t["params"]) for t in trials)) if trials else set()
    for t in trials:
        study.add_trial(optuna.trial.create_trial(params={k: t["params"][k] for k in keys},
                                                  distributions={k: t["distributions"][k] for k in keys}, value=t["value"]))
    with quiet_experimental():
        return optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))


def search_section(studies: list[StudyData]) -> Section:
    s = Section("search", "4. What the search learned")
    s.p(f"Parameter importances: {IMPORTANCE}, over the completed TopoCAM trials of every sampler and seed of a study "
        "(the validation objective; test is never read).")
    for d in studies:
        s.h(d.name)
        if d.trials:
            vary = [k for k in d.trials[0]["params"] if len({str(t["params"].get(k)) for t in d.trials}) > 1]
            if len(d.trials) >= 2 and vary:
                try:
                    imp = importances(d.trials)
                    s.blocks.append(Image(f"importance_{d.name}", F.png(F.importance_figure(
                        imp, f"{d.name}: parameter importances, fANOVA over {len(d.trials)} trials")), f"{d.name}: importances"))
                    s.blocks.append(Table(["parameter", "importance"], [[k, num(v)] for k, v in imp.items()], id=f"importance_{d.name}"))
                except Exception as exc:  # too few distinct values: say so
                    s.p(f"Importances not computed: {type(exc).__name__}: {exc}")
            params = [p for p in SLICE_PARAMS if any(p in t["params"] for t in d.trials)]
            if params:
                s.blocks.append(Image(f"slices_{d.name}", F.png(F.slice_figure(
                    d.trials, params, d.spec.objective, f"{d.name}: {d.spec.objective} of every completed trial against τ and the fusion weights")),
                    f"{d.name}: slice plots"))
        else:
            why = f" ({d.trials_error})" if d.trials_error else ""
            s.blocks.append(Missing(f"{d.name}: no completed trials in the storage{why}", d.missing.get("trials", "")))
        if d.figures:
            s.p(f"The best configuration's figures, as logged to {d.figures_from}.")
            for name, data in d.figures.items():
                s.blocks.append(Image(f"{name}_{d.name}", data, f"{d.name}: {name.replace('_', ' ')}"))
        else:
            s.blocks.append(Missing(f"{d.name}: no logged Betti curves or CAM overlays (the ablation logs the reference's; "
                                    "topocam explain RUN_ID logs a study's best run's)", d.missing["figures"]))
    return s


# ---------------------------------------------------------------- 5. provenance


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def provenance_section(studies: list[StudyData], storage_url: str, tracking_uri: str, suite: str, command: str,
                       data_dir: str | None, now: dt.datetime) -> Section:
    s = Section("provenance", "5. Provenance")
    rows = [[str(d.spec.path), d.digest] for d in studies]
    s.blocks.append(Table(["study file", "SHA-256"], rows, id="digests"))
    inputs = []
    for d in studies:
        for what, p in [("comparison", d.compare_path), *((f"ablation {k}", v) for k, v in d.ablation_paths.items())]:
            if p.is_file():
                inputs.append([d.name, what, str(p), dt.datetime.fromtimestamp(p.stat().st_mtime, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")])
    if inputs:
        s.blocks.append(Table(["study", "input", "file", "written"], inputs))
    s.blocks.append(Table(["", ""], [
        ["Optuna storage", redact_url(storage_url)], ["MLflow tracking", redact_url(tracking_uri)],
        ["machine", f"{platform.node()} ({platform.platform()}, {os.cpu_count()} CPUs)"],
        ["Python", sys.version.split()[0]], *[[p, _version(p)] for p in PACKAGES],
        ["report written", now.strftime("%Y-%m-%d %H:%M:%S UTC")], ["command", command]]))
    data = f" --data-dir {data_dir}" if data_dir else ""
    cmds = []
    for d in studies:
        cmds += [["1, 2, 4", f"topocam study compare {d.spec.path}{data}"],
                 ["1, 3, 4 (figures)", f"topocam ablate {d.spec.path} --suite {suite}{data}"]]
    cmds.append(["the page", command])
    s.blocks.append(Table(["sections", "command that reproduces them"], cmds))
    return s


# ---------------------------------------------------------------- the page


def build_report(specs, storage_url: str, tracker, runs_dir: Path, out_dir: Path, formats: tuple[str, ...] | list[str] = FORMATS,
                 ablations: bool = False, suite: str = "paper", data_dir: str | None = None,
                 command: str = "topocam report") -> ReportResult:
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise TopoCAMError(f"--format: unknown format(s) {bad or formats}; choose from {', '.join(FORMATS)}")
    now = dt.datetime.now(dt.UTC)
    refs = load_references()
    with tempfile.TemporaryDirectory(prefix="topocam-report-") as tmp:
        studies = gather(specs, storage_url, tracker, Path(runs_dir), ablations, suite, Path(tmp), data_dir)
    sections = [headline_section(studies, refs, suite), sampler_section(studies)]
    if ablations:
        sections.append(ablation_section(studies, suite, refs))
    sections += [search_section(studies),
                 provenance_section(studies, storage_url, tracker.uri if tracker else "—", suite, command, data_dir, now)]
    title = "TopoCAM report: " + ", ".join(d.name for d in studies)
    subtitle = (f"Written {now.strftime('%Y-%m-%d %H:%M UTC')} from the stored studies, comparisons and ablations; nothing was "
                "re-trained. Numbers at three decimals; test metrics only of configurations chosen on validation.")
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {"html": to_html, "md": to_markdown, "tex": to_latex}
    ext = {"html": "html", "md": "md", "tex": "tex"}
    files = {}
    for f in formats:
        files[f] = out_dir / f"report.{ext[f]}"
        write_text_atomic(files[f], writers[f](title, subtitle, sections))
    run_id = None
    if tracker is not None:
        exp = tracker.experiment("topocam-report")
        run_id = tracker.start_run(exp, "report-" + "+".join(d.name for d in studies),
                                   {"kind": "report", "studies": ",".join(d.name for d in studies), "suite": suite,
                                    "ablations": str(ablations).lower()},
                                   params={"studies": ",".join(str(d.spec.path) for d in studies), "formats": ",".join(formats)})
        try:
            for p in files.values():
                tracker.log_artifact(run_id, p, "report")
            tracker.finish(run_id)
        except BaseException:
            tracker.finish(run_id, "FAILED")
            raise
    return ReportResult(files, run_id, studies)
