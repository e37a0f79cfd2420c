"""``topocam report``: one self-contained page over studies, comparisons and ablations."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import (
    DATA_DIR_OPTION,
    RUNS_DIR_OPTION,
    STORAGE_OPTION,
    TRACKING_URI_OPTION,
    _study_storage,
    app,
    console,
    ensure_writable_dir,
    fail,
)


@app.command("report")
def report_cmd(
    study_files: list[Path] = typer.Argument(..., help="study definitions (TOML) to report on, one headline row each"),
    ablations: bool = typer.Option(False, "--ablations", help="add the ablation section (forest plots, the paper's claims)"),
    suite: str = typer.Option("paper", "--suite", help="the ablation suite whose tables are read (RUNS_DIR/ablate/STUDY-SUITE)"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for the report (default: RUNS_DIR/report/STUDY+STUDY)"),
    formats: str = typer.Option("html,md,tex", "--format", help="comma-separated formats to write: html, md, tex"),
    storage: Optional[str] = STORAGE_OPTION,
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    runs_dir: Path = RUNS_DIR_OPTION,
    data_dir: Optional[Path] = DATA_DIR_OPTION,
):
    """A report a researcher can read and publish: headline table with verdicts, sampler comparison,
    ablations, what the search learned and provenance, from what is stored (nothing is re-trained);
    logged to MLflow as a kind=report run."""
    from topocam import TopoCAMError
    from topocam.report.build import build_report
    from topocam.report.render import FORMATS
    from topocam.search.studyfile import load_study
    from topocam.tracking import Tracker

    wanted = [f.strip() for f in formats.split(",") if f.strip()]
    bad = [f for f in wanted if f not in FORMATS]
    if bad or not wanted:  # before any store is opened or made
        fail(f"--format: unknown format(s) {', '.join(bad) or repr(formats)}; choose from {', '.join(FORMATS)}")
    try:
        specs = [load_study(p, data_dir=str(data_dir) if data_dir else None) for p in study_files]
        names = [s.name for s in specs]
        out_dir = out or runs_dir / "report" / "+".join(dict.fromkeys(names))
        ensure_writable_dir(out_dir)
        tracker = Tracker(tracking_uri, runs_dir)
        command = "topocam " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["report"] else "topocam report " + " ".join(
            str(p) for p in study_files) + (" --ablations" if ablations else "")
        result = build_report(specs, _study_storage(storage, runs_dir), tracker, runs_dir, out_dir,
                              wanted, ablations=ablations, suite=suite,
                              data_dir=str(data_dir) if data_dir else None, command=command)
    except TopoCAMError as exc:
        fail(str(exc))
    for d in result.studies:
        for what, cmd in d.missing.items():
            if what != "ablation" or ablations:
                why = f" ({d.trials_error})" if what == "trials" and d.trials_error else ""
                console.print(f"{d.name}: no {what}{why}; run: {cmd}", markup=False, highlight=False, soft_wrap=True)
    for p in result.files.values():
        console.print(str(p), markup=False, highlight=False, soft_wrap=True)
    if result.run_id:
        console.print(f"MLflow: logged to run {result.run_id} (kind=report) in {tracker.uri}", markup=False, highlight=False, soft_wrap=True)
