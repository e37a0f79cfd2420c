"""`topocam report`: the rank statistics against hand computations, the verdict rule, and the
page built from a small real study (compare, a small ablation) and opened in Chromium."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy.stats import friedmanchisquare
from typer.testing import CliRunner

from topocam.cli import app
from topocam.report.cd import (
    blocks_needed,
    critical_difference,
    friedman_nemenyi,
    nemenyi_q,
    verdict,
)

from .test_serving import CHROMIUM, CHROMIUM_ARGS
from .test_study import write_study

SECTIONS = ("headline", "samplers", "ablations", "search", "provenance")


# ------------------------------------------------------------------ statistics


def test_friedman_and_nemenyi_against_a_hand_computation():
    # 4 blocks x 3 samplers, higher is better; ranks (1 = best): A 1,1,1,2  B 2,2,3,1  C 3,3,2,3
    v = np.array([[3, 2, 1], [3, 2, 1], [3, 1, 2], [2, 3, 1]], dtype=float)
    t = friedman_nemenyi(v, ["A", "B", "C"])
    assert t.mean_ranks == pytest.approx([1.25, 2.0, 2.75])
    # chi2 = 12 N / (k (k+1)) * sum(R_j^2) - 3 N (k+1) = 4 * 13.125 - 48 = 4.5; df 2: p = exp(-4.5 / 2)
    assert t.statistic == pytest.approx(4.5) and t.p_value == pytest.approx(math.exp(-2.25))
    assert t.statistic == pytest.approx(friedmanchisquare(*v.T).statistic)
    # Demšar (2006), Table 5: q_0.05 = 2.343 (k=3), 2.569 (k=4); CD = q sqrt(k (k+1) / (6 N))
    assert nemenyi_q(3) == pytest.approx(2.343, abs=1e-3) and nemenyi_q(4) == pytest.approx(2.569, abs=1e-3)
    assert t.cd == pytest.approx(2.343 * math.sqrt(12 / 24), abs=1e-3) == critical_difference(3, 4)
    assert not t.differs("A", "C")  # 1.5 apart, CD 1.657
    # N > q^2 k (k+1) / (6 g^2) = 2.343^2 * 2 / 1 = 10.98 for a gap of 1: 11 blocks
    assert blocks_needed(3, 1.0) == 11 and critical_difference(3, 11) < 1.0 < critical_difference(3, 10)


def test_two_samplers_friedman_is_the_sign_test_statistic():
    v = np.array([[2, 1]] * 4 + [[1, 2]], dtype=float)  # A wins 4 of 5 blocks
    t = friedman_nemenyi(v, ["A", "B"])
    assert t.mean_ranks == pytest.approx([1.2, 1.8])
    assert t.statistic == pytest.approx((4 - 1) ** 2 / 5)  # 12/(n k (k+1)) sum S^2 - 3 n (k+1) = 1.8


@pytest.mark.parametrize("interval, words", [
    ([0.01, 0.2], "supported"), ([-0.1, 0.05], "not supported"), ([0.0, 0.1], "not supported"),
    ([-0.2, -0.01], "reversed"), (None, "no paired interval"), ([math.nan, math.nan], "no paired interval"),
])
def test_verdict_rule(interval, words):
    assert verdict(interval) == words


# ------------------------------------------------------------------ the page


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A tiny study compared (2 samplers x 2 seeds x 3 trials, 2 replication seeds), a small
    ablation (the CNN, Topo-Original, the hybrid head, one leakage arm), then `topocam report`."""
    root = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setenv("TOPOCAM_CACHE_DIR", str(root / "cache"))
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    study = write_study(root, "tinyreport", study={"samplers": ["random", "tpe"], "seeds": [0, 1], "n_trials": 3,
                                                   "replicate_seeds": [0, 1]},
                        space={"tau": {"low": 0.3, "high": 0.7}})
    suite = root / "paper.toml"
    suite.write_text("""[suite]
name = "paper"
[[ablation]]
name = "baselines"
arms = [{ arm = "cnn", method = "cnn" }, { arm = "topo_original", method = "topo_original" }]
[[ablation]]
name = "beyond"
arms = [{ arm = "hybrid_head", head = "hybrid" }]
[[ablation]]
name = "leakage"
leakage_audit = true
arms = [{ arm = "label", cam_target = "label" }]
""")
    runs = root / "runs"
    cli = CliRunner()
    try:
        # before anything ran: every section says which command produces its inputs
        empty = root / "empty"
        r = cli.invoke(app, ["report", str(study), "--ablations", "--runs-dir", str(empty), "--out", str(root / "empty-out")])
        assert r.exit_code == 0, r.output
        missing_html = (root / "empty-out" / "report.html").read_text()
        r = cli.invoke(app, ["study", "compare", str(study), "--runs-dir", str(runs), "--quiet"])
        assert r.exit_code == 0, r.output
        r = cli.invoke(app, ["ablate", str(study), "--suite", str(suite), "--seeds", "0,1", "--runs-dir", str(runs), "--quiet"])
        assert r.exit_code == 0, r.output
        out = root / "out"
        r = cli.invoke(app, ["report", str(study), "--ablations", "--runs-dir", str(runs), "--out", str(out)])
        assert r.exit_code == 0, r.output
        yield {"root": root, "study": study, "runs": runs, "out": out, "output": r.output, "missing_html": missing_html}
    finally:
        mp.undo()


def test_missing_inputs_say_which_command_makes_them(reported):
    html = reported["missing_html"]
    study = reported["study"]
    assert f"topocam study compare {study}" in html
    assert f"topocam ablate {study} --suite paper" in html
    assert f"topocam study compare {study} &amp;&amp; topocam ablate {study} --suite paper" in html  # the headline needs both
    assert "no completed trials in the storage (no study storage at" in html
    for s in SECTIONS:
        assert f'<section id="{s}">' in html


def test_report_files_and_mlflow_run(reported):
    out, runs = reported["out"], reported["runs"]
    for ext in ("html", "md", "tex"):
        assert (out / f"report.{ext}").is_file()
        assert str(out / f"report.{ext}") in reported["output"]
    md, tex = (out / "report.md").read_text(), (out / "report.tex").read_text()
    assert "## 1. Headline" in md and "| study | CNN |" in md
    assert r"\begin{tabular}" in tex and r"\end{document}" in tex and tex.isascii()  # pdflatex-safe
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("topocam-report")
    [run] = client.search_runs([exp.experiment_id], "tags.kind = 'report'")
    assert run.info.run_id in reported["output"] and run.data.tags["studies"] == "tinyreport"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {
        "report/report.html", "report/report.md", "report/report.tex"}


def _stat(values):
    v = np.array(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def test_page_in_chromium_numbers_are_the_stored_runs(reported):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium package")
    from playwright import sync_api

    runs = reported["runs"]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(("file:", "data:")) else route.continue_())
            page.goto((reported["out"] / "report.html").as_uri())
            ids = page.eval_on_selector_all("section", "els => els.map(e => e.id)")
            widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
            cells = page.eval_on_selector_all("#headline tbody tr td", "els => els.map(e => e.innerText)")
        finally:
            browser.close()
    assert ids == list(SECTIONS)
    assert len(widths) >= 6 and all(w > 0 for w in widths), widths  # best-so-far, rank, CD, forest, importance, slices, logged figures
    # the headline's numbers, read independently from the stored MLflow runs of the ablation (test metrics per model seed)
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tinyreport-ablate")
    arms = client.search_runs([exp.experiment_id], "tags.kind = 'ablation_arm'", max_results=100)
    by = {}
    for r in arms:
        by.setdefault((r.data.tags["ablation"], r.data.tags["arm"]), []).append(r.data.metrics)
    cnn, orig, topocam, hybrid = (by[k] for k in (("baselines", "cnn"), ("baselines", "topo_original"), ("reference", "topocam"),
                                                  ("beyond", "hybrid_head")))
    _, c_cnn, c_orig, c_topocam, c_hybrid, _, _, c_verdict = cells[:8]
    for cell, ms in ((c_cnn, cnn), (c_orig, orig), (c_topocam, topocam), (c_hybrid, hybrid)):
        assert f"AUC {_stat([m['test_auc'] for m in ms])}" in cell, cell
        assert f"ACC {_stat([m['test_acc'] for m in ms])}" in cell, cell
        assert "n=2" in cell
    # the verdict's interval is the ablation's paired interval of the arm's Δ, negated (TopoCAM − arm)
    ab = json.loads((runs / "ablate" / "tinyreport-paper" / "ablation.json").read_text())
    d = next(r for r in ab["rows"] if r["arm"] == "cnn")["delta_auc"]
    assert f"[{-d['ci95'][1]:.3f}, {-d['ci95'][0]:.3f}]" in c_verdict.replace("−", "-")
    assert verdict([-d["ci95"][1], -d["ci95"][0]]) in c_verdict
    # the comparison's p-values against random search are the report's
    cmp = json.loads((runs / "compare" / "tinyreport" / "comparison.json").read_text())
    p = next(r for r in cmp["rows"] if r["sampler"] == "tpe")["p_vs_random"]
    assert "| tpe | 2 |" in (reported["out"] / "report.md").read_text() and f"{p:.3f}" in (reported["out"] / "report.md").read_text()


def test_every_reference_number_carries_its_citation():
    from topocam.report.gather import claims_for, load_references, references_for

    refs = load_references()
    assert refs["reference"] and refs["claim"]
    for r in refs["reference"]:
        assert {"dataset", "size", "source", "model", "auc", "acc", "citation", "table", "row"} <= set(r), r
        assert 0 < r["auc"] <= 1 and 0 < r["acc"] <= 1
    for c in refs["claim"]:
        assert {"dataset", "claim", "value", "source"} <= set(c), c
    assert {r["model"] for r in references_for(refs, "breastmnist")} >= {"ResNet-18 (28)", "TopoCAM"}
    from topocam.report.build import CLAIMS

    assert set(claims_for(refs, "adrenalmnist3d")) <= {c for c, _, _ in CLAIMS}  # every claim's wording is one the report states


def test_bad_format_is_one_line_and_makes_nothing(tmp_path):
    runs = tmp_path / "runs"
    r = CliRunner().invoke(app, ["report", str(Path(__file__).resolve().parents[1] / "studies" / "quickstart.toml"),
                                 "--format", "html,pdf", "--runs-dir", str(runs)])
    assert r.exit_code != 0 and r.output.strip().startswith("error: --format: unknown format(s) pdf")
    assert len(r.output.strip().splitlines()) == 1 and not runs.exists()
