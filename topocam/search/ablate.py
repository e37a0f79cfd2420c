"""``topocam ablate``: a suite of ablations, every arm over seeds, against one reference.

A suite is data (``studies/ablations/<name>.toml``): ablations, each a list of arms,
each arm a few settings changed from the *reference*, which is TopoCAM at the study's
best configuration (chosen on the study's validation objective, never on test) or at
the study file's base configuration. Every arm runs under every model seed (its own
backbone, CAMs and MLP seed), on the test split, and is summarised as mean ± sd over
seeds with a bootstrap 95 % interval; its difference to the reference is a paired
bootstrap over the same test images (:func:`topocam.stats.seed_mean_difference_ci`).

Arms of an ablation marked ``leakage_audit = true`` take one of the reference
implementation's shortcuts (:attr:`TopoCAMConfig.leaks`); their numbers are the
inflation such code reports and are marked invalid in every table. An arm that
cannot run (e.g. pretrained weights absent) is listed as not run with the reason.
"""

from __future__ import annotations

import csv
import io
import math
import tomllib
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.atomic import write_json_atomic, write_text_atomic
from ..core.backbone import pretrained_weights_file, resolve_backbone
from ..core.data import Dataset
from ..core.errors import DegenerateBackboneWarning, TopoCAMError
from ..core.pipeline import Context, baseline, evaluate, load_data, prepare, roi_quality
from ..core.settings import TopoCAMConfig, arm_settings
from ..core.stats import format_mean_sd, mean_sd, seed_mean_ci, seed_mean_difference_ci
from .fingerprint import check_data
from .space import apply_params
from .studyfile import folder_given

# what an arm may change: every setting declared with arm=True; "method" also takes "cnn" (the backbone's own prediction)
ARM_SETTINGS = arm_settings()
REPORT_SPLITS = ("test", "val")
ROI_QUALITY = {"dice": "ROI Dice", "iou": "IoU", "pointing_game": "pointing game", "betti_error": "Betti error"}  # "val": what a shortcut reports as its result (mlp_stop = val)
METRICS = ("auc", "acc")


@dataclass(frozen=True)
class Arm:
    ablation: str
    name: str
    settings: dict[str, Any]  # changed from the reference
    leakage: bool = False
    report: str = "test"  # the split whose number the arm stands for
    about: str = ""

    @property
    def key(self) -> str:
        return f"{self.ablation}={self.name}"


REFERENCE = Arm("reference", "topocam", {}, about="TopoCAM at the reference configuration")


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str
    arms: tuple[Arm, ...]


def _arm(ablation: str, raw: Any, leakage: bool, where: str) -> Arm:
    if not isinstance(raw, dict) or not isinstance(raw.get("arm"), str):
        raise TopoCAMError(f"{where}: every arm of ablation {ablation!r} needs a table with a string 'arm' name, got {raw!r}")
    name = raw["arm"]
    report = raw.get("report", "test")
    if report not in REPORT_SPLITS:
        raise TopoCAMError(f"{where}: ablation {ablation!r} arm {name!r}: report must be one of {REPORT_SPLITS}, got {report!r}")
    settings = {k: v for k, v in raw.items() if k not in ("arm", "report", "about")}
    for k, v in settings.items():
        if k not in ARM_SETTINGS:
            raise TopoCAMError(f"{where}: ablation {ablation!r} arm {name!r}: unknown setting {k!r}; allowed: {sorted(ARM_SETTINGS)}")
        if not (k == "method" and v == "cnn"):
            ARM_SETTINGS[k].check(v, f"{where}: ablation {ablation!r} arm {name!r}: ")
    arm = Arm(ablation, name, settings, leakage, report, str(raw.get("about", "")))
    if settings.get("method") != "cnn":  # check the settings now, not after an hour of training
        try:
            leaks = config_for(TopoCAMConfig(), arm).validated().leaks
        except TopoCAMError as exc:
            raise TopoCAMError(f"{where}: ablation {ablation!r} arm {name!r}: {exc}") from None
        if leaks and not leakage:
            raise TopoCAMError(f"{where}: ablation {ablation!r} arm {name!r} takes a shortcut ({', '.join(leaks)}); "
                               "only an ablation with leakage_audit = true may")
        if leakage and not leaks:
            raise TopoCAMError(f"{where}: ablation {ablation!r} is a leakage audit, but arm {name!r} takes no shortcut "
                               "(set cam_target = 'label', betti_grid = 'per_image' or mlp_stop = 'val')")
    return arm


SUITE_KEYS = ("description", "name")  # of a suite file's [suite] table


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file (errors name the file, the ablation and the arm)."""
    path = Path(path)
    if path.is_dir():
        raise TopoCAMError(folder_given(path, "ablation suite"))
    if not path.is_file():
        raise TopoCAMError(f"ablation suite {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TopoCAMError(f"{path}: not valid TOML ({exc})") from None
    where = str(path)
    unknown = sorted(set(doc) - {"suite", "ablation"})
    if unknown:
        raise TopoCAMError(f"{where}: unknown table(s) {unknown}; allowed: [suite], [[ablation]]")
    suite = doc.get("suite", {})
    if not isinstance(suite, dict):
        raise TopoCAMError(f"{where}: suite must be a [suite] table (name, description)")
    unknown = sorted(set(suite) - set(SUITE_KEYS))
    if unknown:
        raise TopoCAMError(f"{where}: [suite]: unknown key(s) {unknown}; allowed: {', '.join(SUITE_KEYS)}")
    ablations = doc.get("ablation", [])
    if not isinstance(ablations, list) or not ablations:
        raise TopoCAMError(f"{where}: needs at least one [[ablation]] table")
    arms: list[Arm] = []
    for ab in ablations:
        name = ab.get("name") if isinstance(ab, dict) else None
        if not isinstance(name, str) or not name:
            raise TopoCAMError(f"{where}: every [[ablation]] needs a name")
        unknown = sorted(set(ab) - {"name", "about", "leakage_audit", "arms"})
        if unknown:
            raise TopoCAMError(f"{where}: ablation {name!r}: unknown key(s) {unknown}; allowed: about, arms, leakage_audit, name")
        raw_arms = ab.get("arms", [])
        if not isinstance(raw_arms, list) or not raw_arms:
            raise TopoCAMError(f"{where}: ablation {name!r} has no arms")
        arms += [_arm(name, a, bool(ab.get("leakage_audit", False)), where) for a in raw_arms]
    keys = [a.key for a in arms]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise TopoCAMError(f"{where}: arm(s) {dup} declared twice")
    return Suite(str(suite.get("name", path.stem)), path, str(suite.get("description", "")), tuple(arms))


def find_suite(name_or_path: str, study_path: Path) -> Path:
    """A suite file path, or a name looked up in ``ablations/`` beside the study file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return p
    for folder in (study_path.parent / "ablations", Path("studies") / "ablations"):
        if (folder / f"{name_or_path}.toml").is_file():
            return folder / f"{name_or_path}.toml"
    raise TopoCAMError(f"no ablation suite {name_or_path!r}: looked for {study_path.parent / 'ablations' / (name_or_path + '.toml')}; "
                       "pass a suite file path or a name from studies/ablations/")


def config_for(reference: TopoCAMConfig, arm: Arm) -> TopoCAMConfig:
    """The reference configuration with the arm's settings changed (as each setting holds them: tuples, floats)."""
    return replace(reference, **{k: ARM_SETTINGS[k].check(v) for k, v in arm.settings.items() if k != "method" or v != "cnn"})


# ------------------------------------------------------------------ running


@dataclass
class ArmSeed:
    val: dict[str, float]
    test: dict[str, float]
    probs: dict[str, np.ndarray]  # val, test
    empty_rois: dict[str, int] = field(default_factory=dict)
    degenerate_backbone: bool = False
    roi_quality: dict[str, float] | None = None  # the ROI against the true lesion, on test (data with lesion masks)


@dataclass
class ArmResult:
    arm: Arm
    config: TopoCAMConfig | None
    seeds: dict[int, ArmSeed] = field(default_factory=dict)
    not_run: str | None = None  # the reason, when the arm could not run
    source: str = ""  # where the arm's configuration came from (tuned baselines)


@dataclass
class Ablation:
    """Runs arms on per-seed contexts shared between arms (a backbone and its CAMs are
    built once per seed, CAM target rule and init)."""

    reference: TopoCAMConfig
    seeds: list[int]
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> params of its tuned configuration
    progress: bool = True
    log: Callable[[str], None] = print
    data: Dataset | None = None  # the study's dataset, when already loaded (and checked against the study's)
    # fetches a seed's published model into the local cache before it is prepared (``artifacts.fetch_published``)
    fetch: Callable[[TopoCAMConfig, Dataset], object] | None = None
    _contexts: dict[tuple, Context] = field(default_factory=dict)
    _memo: dict[tuple, ArmSeed] = field(default_factory=dict)

    def context(self, cfg: TopoCAMConfig) -> Context:
        key = (cfg.seed, cfg.cam_target, cfg.init)
        if key not in self._contexts:
            data = next(iter(self._contexts.values())).data if self._contexts else self.data
            if self.fetch is not None:  # an arm whose model differs (CAM target, init) finds none published: local
                data = data if data is not None else load_data(cfg)
                self.fetch(cfg, data)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DegenerateBackboneWarning)
                ctx = prepare(cfg, progress=self.progress, data=data)
            if ctx.health().degenerate:
                self.log(f"warning: seed {cfg.seed}: {ctx.health().message}")
            self._contexts[key] = ctx
        return self._contexts[key]

    def why_not(self, arm: Arm, cfg: TopoCAMConfig) -> str | None:
        if cfg.roi == "segmenter" and cfg.method == "topocam":
            data = self.data if self.data is not None else self.context(replace(self.reference, seed=self.seeds[0])).data
            if data.lesion_masks is None:
                return f"roi=segmenter trains on lesion masks, and {data.name} has none"
        if cfg.init == "pretrained":
            ndim = len(self.context(replace(self.reference, seed=self.seeds[0])).data.shape)
            found, why = pretrained_weights_file(resolve_backbone(cfg.backbone, ndim))
            return None if found else why
        return None

    def arm_config(self, arm: Arm) -> tuple[TopoCAMConfig, str]:
        cfg = config_for(self.reference, arm)
        method = arm.settings.get("method")
        if method in self.tuned:  # the baseline at its own tuned configuration (equal budget)
            cfg = replace(apply_params(replace(self.reference, method=method), self.tuned[method]["params"]), method=method)
            return cfg, self.tuned[method]["source"]
        return cfg, ""

    def run_arm(self, arm: Arm, bar=None) -> ArmResult:
        cfg, source = self.arm_config(arm)
        why = self.why_not(arm, cfg)
        if why:
            if bar is not None:
                bar.update(len(self.seeds))
            return ArmResult(arm, cfg, not_run=why, source=source)
        res = ArmResult(arm, cfg, source=source)
        for seed in self.seeds:
            res.seeds[seed] = self.run_seed(arm, replace(cfg, seed=seed))
            if bar is not None:
                bar.update(1)
        return res

    def run_seed(self, arm: Arm, cfg: TopoCAMConfig) -> ArmSeed:
        cnn = arm.settings.get("method") == "cnn"
        key = ("cnn", cfg.seed, cfg.init) if cnn else cfg  # frozen, hashable
        if key in self._memo:  # an arm equal to another (e.g. the reference's own tau) is computed once
            return self._memo[key]
        ctx = self.context(cfg)
        if cnn:
            b = baseline(ctx, cfg, "cnn")
            out = ArmSeed(b.val, b.test, b.probs, degenerate_backbone=ctx.health().degenerate)
        else:
            r = evaluate(ctx, cfg, report_test=True)
            q = roi_quality(ctx, cfg) if cfg.method == "topocam" else None
            out = ArmSeed(r.val, r.test, r.probs, dict(r.features.empty_rois), ctx.health().degenerate, q)
        self._memo[key] = out
        return out


# ---------------------------------------------------------------- reporting


def summarise(results: list[ArmResult], reference: ArmResult, y: dict[str, np.ndarray], task: str) -> list[dict]:
    """One row per arm: its reported number (mean ± sd, interval) and the difference to
    the reference's test number (paired bootstrap when both are on test)."""
    rows = []
    for r in results:
        a = r.arm
        row: dict[str, Any] = {
            "ablation": a.ablation, "arm": a.name, "settings": a.settings, "report": a.report,
            "valid": not a.leakage, "leakage_audit": a.leakage, "source": r.source,
            "status": "not run" if r.not_run else "ok", "reason": r.not_run or "",
            "seeds": sorted(r.seeds),
        }
        if r.seeds:
            seeds = sorted(r.seeds)
            split = a.report
            probs = [r.seeds[s].probs[split] for s in seeds]
            for m in METRICS:
                st = mean_sd([getattr(r.seeds[s], split)[m] for s in seeds])
                st["ci95"] = seed_mean_ci(y[split], probs, task, m)
                row[m] = st
                common = [s for s in seeds if s in reference.seeds]
                diffs = [getattr(r.seeds[s], split)[m] - reference.seeds[s].test[m] for s in common]
                d = mean_sd(diffs)
                d["ci95"] = seed_mean_difference_ci(
                    y[split], [r.seeds[s].probs[split] for s in common], y["test"],
                    [reference.seeds[s].probs["test"] for s in common], task, m, paired=(split == "test"),
                ) if common else [math.nan, math.nan]
                lo, hi = d["ci95"]
                d["excludes_zero"] = bool(math.isfinite(lo) and (lo > 0 or hi < 0))
                row[f"delta_{m}"] = d
            row["empty_rois_train"] = mean_sd([r.seeds[s].empty_rois.get("train", 0) for s in seeds]) if r.seeds[seeds[0]].empty_rois else None
            row["degenerate_backbone_seeds"] = [s for s in seeds if r.seeds[s].degenerate_backbone]
            qs = [r.seeds[s].roi_quality for s in seeds if r.seeds[s].roi_quality]
            if qs:
                row["roi_quality"] = {k: mean_sd([q[k] for q in qs]) for k in ROI_QUALITY}
        rows.append(row)
    return rows


def _ci(st: dict) -> str:
    lo, hi = st.get("ci95", [math.nan, math.nan])
    return f"[{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else "—"


def _delta(d: dict | None) -> str:
    if not d or not d.get("n"):
        return "—"
    return f"{d['mean']:+.3f} {_ci(d)}{' *' if d['excludes_zero'] else ''}"


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "(reference)"


def markdown(rows: list[dict], title: str) -> str:
    head = ("| ablation | arm | settings | AUC mean ± sd | AUC 95 % CI | ACC mean ± sd | Δ AUC vs reference [95 % CI] "
            "| Δ ACC vs reference [95 % CI] | status |")
    lines = [f"# {title}", "", head, "|" + "---|" * 9]
    for r in rows:
        status = ("INVALID (leakage audit)" if r["leakage_audit"] else "ok") if r["status"] == "ok" else f"not run: {r['reason']}"
        if r["report"] != "test":
            status += f"; number on {r['report']}"
        if r.get("degenerate_backbone_seeds"):
            status += f"; degenerate backbone on seed(s) {r['degenerate_backbone_seeds']}"
        if r["source"]:
            status += f"; {r['source']}"
        lines.append(
            f"| {r['ablation']} | {r['arm']} | {_settings_text(r['settings'])} | {format_mean_sd(r.get('auc'))} | "
            f"{_ci(r['auc']) if 'auc' in r else '—'} | {format_mean_sd(r.get('acc'))} | {_delta(r.get('delta_auc'))} | "
            f"{_delta(r.get('delta_acc'))} | {status} |"
        )
    lines += ["", "Mean ± sd over seeds; 95 % CI: stratified bootstrap of the seed-mean over the test images. "
              "Δ: arm minus the reference (TopoCAM at the reference configuration) on test, paired over the same "
              "images; * marks an interval that excludes zero. Leakage-audit arms take a shortcut of the reference "
              "implementation: their numbers are the inflation such code reports, never a result.", ""]
    with_q = [r for r in rows if r.get("roi_quality")]
    if with_q:
        lines += ["## The ROI against the true lesion (test split)", "",
                  "| ablation | arm | " + " | ".join(f"{ROI_QUALITY[k]} mean ± sd" for k in ROI_QUALITY) + " |",
                  "|" + "---|" * (2 + len(ROI_QUALITY))]
        lines += [f"| {r['ablation']} | {r['arm']} | " + " | ".join(format_mean_sd(r["roi_quality"][k]) for k in ROI_QUALITY)
                  + " |" for r in with_q]
        lines += ["", "Betti error: Σ_k |β_k(ROI) − β_k(lesion)| per image (β_0, β_1, and β_2 in 3D), the lesion "
                  "mask as drawn (its hole or cavity included).", ""]
    return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
    flat = []
    for r in rows:
        d = {k: r[k] for k in ("ablation", "arm", "report", "valid", "status", "reason", "source")}
        d["settings"] = _settings_text(r["settings"])
        for m in METRICS:
            for prefix in ("", "delta_"):
                st = r.get(f"{prefix}{m}")
                if st:
                    d[f"{prefix}{m}_mean"], d[f"{prefix}{m}_sd"] = st["mean"], st["sd"]
                    d[f"{prefix}{m}_ci_low"], d[f"{prefix}{m}_ci_high"] = st["ci95"]
                    if prefix:
                        d[f"{prefix}{m}_excludes_zero"] = st["excludes_zero"]
        flat.append(d)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for d in flat for k in d)))
    w.writeheader()
    w.writerows(flat)
    return buf.getvalue()


def write_tables(rows: list[dict], title: str, out_dir: Path, extra: dict) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"md": out_dir / "ablation.md", "csv": out_dir / "ablation.csv", "json": out_dir / "ablation.json"}
    write_text_atomic(files["md"], markdown(rows, title))
    write_text_atomic(files["csv"], csv_text(rows))
    write_json_atomic(files["json"], {**extra, "rows": rows})
    return files


# ------------------------------------------------------------------ driver


@dataclass
class SuiteRun:
    rows: list[dict]
    files: dict[str, Path]
    reference_source: str
    parent_run: str | None = None
    experiment_id: str | None = None


def reference_configs(spec, storage_url: str, base: str, data: Dataset | None = None,
                      log: Callable[[str], None] = print) -> tuple[TopoCAMConfig, str, dict[str, dict[str, Any]]]:
    """The reference configuration, where it came from, and the tuned baselines found.

    ``base="best"``: the study's best TopoCAM trial by its validation objective (as
    ``topocam export`` chooses; test never read), and the best Topo-Original trial of
    its equal-budget search when stored; ``data`` (the study's dataset, where given) must be
    what each was scored on (:func:`.fingerprint.check_data`). ``base="file"``: the study
    file's base."""
    if base == "file":
        return spec.base, f"the base configuration of {spec.path}", {}
    if base != "best":
        raise TopoCAMError(f"--base must be 'best' or 'file', got {base!r}")
    from .choose import choose_trial

    choice = choose_trial(spec, storage_url)
    if data is not None:
        check_data(choice.attrs, choice.optuna_study, data, log)
    ref = apply_params(spec.base, choice.params)
    tuned: dict[str, dict[str, Any]] = {}
    try:
        orig = choose_trial(spec, storage_url, arm="topo_original")
    except TopoCAMError:
        orig = None
    if orig is not None:
        if data is not None:
            check_data(orig.attrs, orig.optuna_study, data, log)
        tuned["topo_original"] = {"params": orig.params,
                                  "source": f"tuned: its best {spec.objective} (validation) is trial {orig.trial} of {orig.optuna_study}"}
    return ref, (f"the study's best {spec.objective} (validation only; test never used): trial {choice.trial} of "
                 f"{choice.optuna_study} ({spec.objective} {choice.value:.4f})"), tuned


def select_arms(suite: Suite, only: list[str] | None, skip: list[str] | None) -> tuple[list[Arm], dict[str, str]]:
    """Arms to run and, for the others, why not (listed in the table, never dropped).
    ``only``/``skip`` name ablations (``tau``) or single arms (``cam=scorecam``)."""
    known = {a.ablation for a in suite.arms} | {a.key for a in suite.arms}
    for names, flag in ((only, "--only"), (skip, "--skip")):
        bad = sorted(set(names or []) - known)
        if bad:
            raise TopoCAMError(f"{flag}: unknown ablation(s)/arm(s) {bad}; known: {', '.join(sorted(known))}")
    run, skipped = [], {}
    for a in suite.arms:
        if only and a.ablation not in only and a.key not in only:
            skipped[a.key] = "left out by --only"
        elif skip and (a.ablation in skip or a.key in skip):
            skipped[a.key] = "left out by --skip"
        else:
            run.append(a)
    return run, skipped


def run_suite(
    spec, suite: Suite, storage_url: str, tracker, seeds: list[int], out_dir: Path, base: str = "best",
    only: list[str] | None = None, skip: list[str] | None = None, progress: bool = True,
    log: Callable[[str], None] = print, figures: bool = False, reference: tuple | None = None, data: Dataset | None = None,
) -> SuiteRun:
    """Every selected arm of ``suite`` under every seed; tables written and, with a
    tracker, one parent run with a child run per (arm, seed) tagged ablation/arm.
    ``reference``: :func:`reference_configs` of this storage and ``base`` if already looked
    up; ``data``: the study's dataset if already read."""
    from tqdm.auto import tqdm

    if not seeds or any(s < 0 for s in seeds):
        raise TopoCAMError(f"--seeds must be non-negative integers, got {seeds}")
    arms, skipped = select_arms(suite, only, skip)
    if reference is None:
        data = data if data is not None else (load_data(spec.base) if base == "best" else None)  # checked before training
        reference = reference_configs(spec, storage_url, base, data, log)
    reference, source, tuned = reference
    log(f"reference: TopoCAM at {source}")
    if "topo_original" not in tuned and any(a.settings.get("method") == "topo_original" for a in arms):
        log("note: no Topo-Original search of this study in the storage: the Topo-Original arm uses the reference's MLP "
            "(not tuned; run `topocam study compare` for the equal-budget baseline)")
    from .artifacts import fetch_published

    ab = Ablation(reference, seeds, tuned, progress, log, data,
                  fetch=lambda cfg, d: fetch_published(spec, d, storage_url, tracker, log, cfg))
    results: list[ArmResult] = []
    with tqdm(total=(len(arms) + 1) * len(seeds), desc=f"ablate {suite.name}", unit="arm-seed", disable=not progress) as bar:
        ref_result = ab.run_arm(REFERENCE, bar)
        for arm in arms:
            bar.set_postfix_str(arm.key)
            results.append(ab.run_arm(arm, bar))
    for arm in suite.arms:
        if arm.key in skipped:
            results.append(ArmResult(arm, None, not_run=skipped[arm.key]))
    order = {a.key: i for i, a in enumerate(suite.arms)}
    results.sort(key=lambda r: order[r.arm.key])
    ctx = next(iter(ab._contexts.values()))
    all_results = [ref_result, *results]
    rows = summarise(all_results, ref_result, ctx.data.y, ctx.data.task)
    title = f"{spec.name}: ablation suite {suite.name!r}, seeds {seeds}"
    extra = {"study": spec.name, "suite": suite.name, "suite_file": str(suite.path), "seeds": seeds,
             "reference": {"source": source, "config": reference.as_dict()}, "dataset": ctx.data.name,
             "n_test": int(len(ctx.data.y["test"]))}
    files = write_tables(rows, title, out_dir, extra)
    out = SuiteRun(rows, files, source)
    if tracker is not None:
        out.experiment_id, out.parent_run, children = log_suite(tracker, spec, suite, all_results, rows, files, seeds, source)
        if figures:
            log_arm_figures(ab, all_results, children, tracker, progress, log)
    return out


def log_arm_figures(ab: Ablation, results: list[ArmResult], children: dict[tuple[str, int], str], tracker,
                    progress: bool, log: Callable[[str], None]) -> None:
    """Figures (Betti curves, t-SNE, CAM overlays, ROC, confusion, ROI quality) of each
    arm's best seed by VALIDATION AUC, logged to that seed's run. Arms without a Betti
    head on an honest ROI (the CNN, the hybrid head, the leakage audit) are left out:
    the figures would show another model than the arm's."""
    from tqdm.auto import tqdm

    from ..tracking import figures

    todo = [r for r in results if r.seeds and r.config is not None and r.arm.settings.get("method") != "cnn"
            and r.config.head == "betti" and not r.arm.leakage]
    for r in tqdm(todo, desc="figures", unit="arm", disable=not progress):
        seed = max(sorted(r.seeds), key=lambda s: r.seeds[s].val.get("auc", -math.inf))
        cfg = replace(r.config, seed=seed)
        try:
            figs = figures.explain(ab.context(cfg), cfg, report_test=True, variants=(cfg.cam,))
            figures.log_figures(tracker, children[(r.arm.key, seed)], figs)
        except TopoCAMError as exc:
            log(f"figures for {r.arm.key} (seed {seed}) not made: {exc}")


def log_suite(tracker, spec, suite: Suite, results: list[ArmResult], rows: list[dict], files: dict[str, Path],
              seeds: list[int], source: str) -> tuple[str, str, dict[tuple[str, int], str]]:
    """One parent run (``kind=ablation``) with the tables; a child per (arm, seed) with its
    metrics and tags ``ablation``, ``arm``, ``seed``, ``leakage_audit``, ``valid``; an arm
    that did not run is one child tagged ``status=not run`` with the reason."""
    exp = tracker.experiment(f"{spec.name}-ablate")
    parent = tracker.start_run(exp, f"ablate-{suite.name}", {"kind": "ablation", "study": spec.name, "suite": suite.name,
                                                           "reference": source[:5000]},
                               params={"seeds": seeds, "suite_file": str(suite.path)})
    children: dict[tuple[str, int], str] = {}
    try:
        for r, row in zip(results, rows):
            a = r.arm
            tags = {"kind": "ablation_arm", "study": spec.name, "suite": suite.name, "ablation": a.ablation, "arm": a.name,
                    "leakage_audit": str(a.leakage).lower(), "valid": str(not a.leakage).lower(), "report": a.report}
            params = {**(r.config.as_dict() if r.config is not None else {}), **{f"arm.{k}": v for k, v in a.settings.items()}}
            if r.not_run:
                rid = tracker.start_run(exp, f"{a.key} (not run)", {**tags, "status": "not run", "reason": r.not_run[:5000]},
                                        parent=parent, params=params)
                tracker.finish(rid)
                continue
            for seed, res in sorted(r.seeds.items()):
                rid = tracker.start_run(exp, f"{a.key} s{seed}", {**tags, "seed": seed, "status": "ok",
                                                                 "degenerate_backbone": str(res.degenerate_backbone).lower()},
                                        parent=parent, params={**params, "seed": seed})
                children[(a.key, seed)] = rid
                tracker.log_metrics(rid, {**{f"val_{m}": v for m, v in res.val.items()},
                                          **{f"test_{m}": v for m, v in res.test.items()},
                                          **{f"empty_rois_{s}": v for s, v in res.empty_rois.items()},
                                          **{f"roi_{k}": v for k, v in (res.roi_quality or {}).items()}})
                tracker.finish(rid)
        for f in files.values():
            tracker.log_artifact(parent, f)
        tracker.finish(parent)
    except BaseException:
        tracker.finish(parent, "FAILED")
        raise
    return exp, parent, children
