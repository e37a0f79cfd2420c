"""A study's model, built once, published, and fetched by every worker.

Why: two machines that train "the same" backbone get different weights (thread counts,
instruction sets, a GPU), so the trials of one distributed study would optimise
different objectives. Here the entries one model seed's context reads (the backbone
checkpoint, its CNN probabilities, every searched CAM variant's maps:
:func:`topocam.core.artifacts.model_entries`) are published once to the study's MLflow
artifact store (a run of kind ``model-artifacts`` in the study's experiment), and their
URIs and SHA-256 digests are recorded in the Optuna storage the workers share:

* in the record study ``<study>.model`` (user attr ``topocam_model_of``; no trials), the
  one place a worker looks: user attr ``model_artifacts:s<seed>`` =
  ``{"run_id", "entries": {entry: {"uri", "sha256", "bytes"}}}``, written in one call,
  only after every upload finished and was downloaded again and re-verified, so a
  publisher killed mid-upload leaves nothing a worker would take as complete;
* in each Optuna study a worker runs (the same attribute), so a study names its model.

A worker (:meth:`ModelArtifacts.ensure`) fetches each entry into its local cache and
checks its digest before the first trial; a local entry that disagrees is an error naming
both digests. Where nothing is recorded, the first worker builds and publishes under the
storage's lock (``storage.storage_lock``) while the others wait, then fetch. An entry that
was deleted or damaged in the store is named and, under the lock, uploaded again from a
local copy with the recorded digest, or rebuilt (its new digest recorded, the change said).
Workers publish on their own only on a storage shared between machines (PostgreSQL,
MySQL); ``topocam study prepare`` publishes on any.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from ..core.artifacts import Artifact, ModelEntries, digest, install_entry, model_entries, verify_entry
from ..core.backbone import default_cache_dir
from ..core.data import Dataset
from ..core.errors import TopoCAMError
from ..core.locks import BadEntry, load_or_build
from ..core.settings import TopoCAMConfig
from ..stores import parse_store_url, redact_url
from ..tracking import Tracker
from .storage import quiet_experimental, storage_lock

RECORD_OF = "topocam_model_of"  # the record study's user attr: the [study] name it records the model of
KIND = "model-artifacts"


def study_cam_variants(spec) -> tuple[str, ...]:
    """The CAM variants any arm of a study (a ``StudySpec``) can ask for: what its published model holds."""
    p = spec.space.get("cam")
    if p is None:
        return (spec.base.cam,)
    return tuple(p.choices) if p.kind == "categorical" else (p.value,)


def fetch_published(spec, data: Dataset, storage_url: str, tracker: Tracker | None, log: Callable[[str], None] = print,
                    config: TopoCAMConfig | None = None) -> Model | None:
    """For a command that reads a study's model without searching (export, ablate, explain): the
    published entries of ``config``'s model seed (default: the study's) fetched into the local
    cache and verified, or, where none is published, the local cache as it is (``"local"``).
    Builds nothing and publishes nothing; the caller's ``prepare`` then reads the cache. None: no
    storage there (an ablation of a study's defaults needs none), so nothing is published."""
    from .storage import open_storage

    try:
        storage = open_storage(storage_url, read_only=True)
    except TopoCAMError:
        return None
    config = config or spec.base
    arts = ModelArtifacts(spec.name, storage_url, storage, tracker, log)
    return arts.ensure(config, data, study_cam_variants(spec), lambda full: False, publish=False)


def check_trial_model(model: Model | None, trial_attrs: dict[str, Any], what: str) -> None:
    """The backbone here is the one the trial was scored on (its ``backbone_sha256``), else a
    TopoCAMError naming both digests. A trial that recorded none (scored before digests were
    recorded) cannot be checked: it passes, and its refit is still checked on validation."""
    want = trial_attrs.get("backbone_sha256")
    if want is None or model is None:
        return
    got = model.sha256(model.entries.backbone)
    if got != want:
        raise TopoCAMError(
            f"{what} was scored on backbone sha256 {want[:16]}…, this machine's is {got[:16]}… "
            f"({model.entries.backbone}): it is not the model the trial saw, and nothing was registered; fetch the "
            "study's published model (same --storage and --tracking-uri as its workers), or run `topocam study prepare`"
        )


def attr_key(seed: int) -> str:
    return f"model_artifacts:s{seed}"


def record_study_name(study: str) -> str:
    return f"{study}.model"


class _Damaged(Exception):
    """A recorded artifact is missing from the store or its download has another digest."""

    def __init__(self, entry: str, why: str):
        super().__init__(f"artifact {entry} {why}")
        self.entry = entry


@dataclass
class Model:
    """One model seed's entries as the study's trials see them, and how this worker got them."""

    seed: int
    entries: ModelEntries
    artifacts: dict[str, Artifact]  # entry -> digest
    # "fetched" (downloaded now), "verified" (already in the local cache), "built" (trained or computed here, then
    # published), "uploaded" (found in the local cache, then published), "local" (nothing published: one machine)
    how: str
    record: dict[str, Any] | None = None
    cache: Path | None = None  # where a "local" model's entries are digested, when first asked

    def sha256(self, entry: str) -> str:
        if entry not in self.artifacts:
            self.artifacts[entry] = digest(self.cache, entry)
        return self.artifacts[entry].sha256

    def digests(self, cam: str | None) -> dict[str, str]:
        """What a trial records: the backbone's and (TopoCAM) its CAM variant's SHA-256."""
        out = {"backbone_sha256": self.sha256(self.entries.backbone)}
        if cam is not None and cam in self.entries.cams:
            out["cam_sha256"] = self.sha256(self.entries.cams[cam])
        return out


def _connection_failure(exc: BaseException) -> bool:
    """The tracking server is unreachable (not: the artifact is not there)."""
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        name = type(exc).__name__
        if name in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "MaxRetryError", "NewConnectionError"):
            return True
        text = str(exc)
        if "Connection refused" in text or "Max retries exceeded" in text or "timed out" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass
class ModelArtifacts:
    """Publishing and fetching one study's model artifacts (see the module doc)."""

    study: str
    storage_url: str
    storage: Any
    tracker: Tracker | None
    log: Callable[[str], None] = print
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def shared(self) -> bool:
        """Workers may run on several machines: they publish what they build."""
        return parse_store_url(self.storage_url).is_database_server

    # ------------------------------------------------------------ the record
    def _record_study(self, create: bool) -> optuna.Study | None:
        name = record_study_name(self.study)
        with quiet_experimental():
            if not create:
                try:
                    return optuna.load_study(study_name=name, storage=self.storage)
                except KeyError:
                    return None
            st = optuna.create_study(study_name=name, storage=self.storage, load_if_exists=True, direction="maximize")
            if st.user_attrs.get(RECORD_OF) != self.study:
                st.set_user_attr(RECORD_OF, self.study)
            return st

    def record(self, seed: int, entries: ModelEntries) -> dict[str, Any] | None:
        """The published record of ``seed``'s entries, or None (none, or one of other entries)."""
        st = self._record_study(create=False)
        rec = st.user_attrs.get(attr_key(seed)) if st is not None else None
        if rec is None or set(rec.get("entries", {})) != set(entries.all):
            return None
        return rec

    # ------------------------------------------------------------ a worker
    def ensure(self, config: TopoCAMConfig, data: Dataset, variants: tuple[str, ...], build: Callable[[bool], Any],
               publish: bool | None = None) -> Model:
        """Make ``config``'s model seed's entries present in the local cache, as published: fetched
        and verified where recorded; else built here (``build()`` fills the local cache) and, when
        ``publish`` (default: a storage shared between machines) and tracked, published under the
        storage's lock while other workers wait. ``build(full)`` fills the local cache: the backbone and
        CNN probabilities, and with ``full`` every variant's CAMs (what is published); it returns
        whether it trained or computed anything."""
        entries = model_entries(config, data, variants)
        cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        publish = (self.shared if publish is None else publish) and self.tracker is not None
        rec = self.record(config.seed, entries)
        damaged: _Damaged | None = None
        if rec is not None and self.tracker is not None:
            try:
                return self._fetch(config.seed, entries, rec, cache)
            except _Damaged as exc:
                damaged = exc  # named and repaired under the lock (a publishing worker), else an error
        if not publish:
            if rec is None:
                build(False)
                return Model(config.seed, entries, {}, "local", cache=cache)
            if damaged is not None:
                raise TopoCAMError(f"model artifacts of study {self.study}, seed {config.seed}: {damaged}; "
                                   "a study worker on the shared storage (or `topocam study prepare`) repairs it")
            for e, a in rec["entries"].items():  # recorded, but no tracking store to fetch from: the local cache must agree
                verify_entry(cache, Artifact(e, a["sha256"], a["bytes"]), "the study recorded")
            build(False)
            return self._verified(config.seed, entries, rec, cache, "verified")
        t0 = time.perf_counter()
        with storage_lock(self.storage_url, self.storage, f"artifacts:{self.study}"):
            self.timings_s["artifacts_lock_wait"] = time.perf_counter() - t0
            rec = self.record(config.seed, entries)
            lost: dict[str, str] = {}
            if rec is not None:
                try:
                    return self._fetch(config.seed, entries, rec, cache)
                except _Damaged as exc:
                    lost = {exc.entry: rec["entries"][exc.entry]["sha256"]}
                    self.log(f"model artifacts of {self.study}, seed {config.seed}: {exc}; repairing it under the lock")
                    self._fetch_all_but_lost(entries, rec, cache, lost)
                    if entries.backbone in lost and not (cache / entries.backbone).exists():
                        for e in (entries.probs, *entries.cams.values()):  # made from the lost backbone: remade with the new one
                            _remove_entry(cache, e)
            t0 = time.perf_counter()
            computed = build(True)
            self.timings_s["artifacts_build"] = time.perf_counter() - t0
            arts = {e: digest(cache, e) for e in entries.all}
            if rec is not None:
                changed = [f"{e} {rec['entries'][e]['sha256'][:12]}… -> {a.sha256[:12]}…" for e, a in arts.items()
                           if rec["entries"][e]["sha256"] != a.sha256]
                if changed:
                    self.log(f"model artifacts of {self.study}, seed {config.seed} rebuilt with new digests ({'; '.join(changed)}): "
                             "trials scored before carry the old digests in their user attrs")
            rec = self._publish(config.seed, entries, arts, cache)
            return Model(config.seed, entries, arts, "built" if computed else "uploaded", rec, cache)

    def _fetch_all_but_lost(self, entries: ModelEntries, rec: dict, cache: Path, lost: dict[str, str]) -> None:
        """Fetch what can be fetched besides the damaged entries (a rebuilt CAM then comes from the
        published backbone); an entry that fails too joins ``lost``."""
        for e in entries.all:
            if e in lost:
                continue
            try:
                self._fetch_one(rec, e, cache)
            except _Damaged:
                lost[e] = rec["entries"][e]["sha256"]

    def _fetch(self, seed: int, entries: ModelEntries, rec: dict[str, Any], cache: Path) -> Model:
        t0 = time.perf_counter()
        fetched = [e for e in entries.all if self._fetch_one(rec, e, cache)]
        self.timings_s["artifacts_fetch"] = time.perf_counter() - t0
        return self._verified(seed, entries, rec, cache, "fetched" if fetched else "verified")

    def _verified(self, seed: int, entries: ModelEntries, rec: dict[str, Any], cache: Path, how: str) -> Model:
        arts = {e: Artifact(e, a["sha256"], a["bytes"]) for e, a in rec["entries"].items()}
        return Model(seed, entries, arts, how, rec, cache)

    def _fetch_one(self, rec: dict[str, Any], entry: str, cache: Path) -> bool:
        """Make ``entry`` present locally with the recorded digest; True if it was downloaded.
        One download per entry among the processes sharing the cache (:func:`load_or_build`)."""
        a = rec["entries"][entry]
        expected = Artifact(entry, a["sha256"], a["bytes"])

        def load() -> bool | None:
            t0 = time.perf_counter()
            ok = verify_entry(cache, expected)
            self.timings_s["artifacts_verify"] = self.timings_s.get("artifacts_verify", 0.0) + time.perf_counter() - t0
            return True if ok else None

        def download() -> bool:
            (cache / entry).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
            try:
                try:
                    local = Path(self.tracker.download_artifacts(rec["run_id"], entry, str(tmp)))
                except Exception as exc:  # noqa: BLE001 - sorted below: the server down, or the artifact gone
                    if _connection_failure(exc):
                        raise TopoCAMError(
                            f"cannot fetch the model artifact {entry} of study {self.study} from the MLflow tracking "
                            f"server {redact_url(self.tracker.uri)} ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                            "no trial was run: start the worker again once the server is back"
                        ) from None
                    raise _Damaged(entry, f"could not be downloaded from run {rec['run_id']} ({type(exc).__name__})") from None
                if not local.exists():
                    raise _Damaged(entry, f"is missing from run {rec['run_id']}")
                try:
                    install_entry(cache, expected, local)
                except TopoCAMError as exc:
                    raise _Damaged(entry, f"is damaged in run {rec['run_id']} ({exc})") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return False

        try:
            _, present = load_or_build(cache / entry, load, download)
        except BadEntry as exc:  # pragma: no cover - load raises no BadEntry
            raise _Damaged(entry, str(exc)) from None
        return not present

    # ------------------------------------------------------------ publishing
    def _publish(self, seed: int, entries: ModelEntries, arts: dict[str, Artifact], cache: Path) -> dict[str, Any]:
        """Upload every entry to a new ``kind=model-artifacts`` run, download each again and check
        its digest, and only then record them (one user attr, one write). A run left by a publisher
        killed before the record is never referenced."""
        t0 = time.perf_counter()
        tr = self.tracker
        exp = tr.experiment(self.study)
        rid = tr.start_run(exp, f"model-artifacts-seed{seed}",
                           {"study": self.study, "kind": KIND, "seed": seed, "state": "uploading"},
                           params={"entries": len(arts), "bytes": sum(a.bytes for a in arts.values())})
        try:
            for e in entries.all:
                path, parent = cache / e, str(Path(e).parent)
                if path.is_dir():
                    tr.log_artifacts(rid, path, e)
                else:
                    tr.log_artifact(rid, path, parent)
            self.timings_s["artifacts_upload"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix=".reverify-", dir=cache) as tmp:
                for e, a in arts.items():
                    local = Path(tr.download_artifacts(rid, e, tmp))
                    got = digest(local.parent, local.name) if local.exists() else None
                    if got is None or got.sha256 != a.sha256:
                        raise TopoCAMError(f"the upload of {e} to run {rid} reads back with sha256 "
                                           f"{got.sha256[:16] if got else 'nothing'}, not {a.sha256[:16]}: nothing was recorded")
            self.timings_s["artifacts_reverify"] = time.perf_counter() - t1
        except BaseException:
            try:
                tr.set_tags(rid, {"state": "abandoned"})
                tr.finish(rid, "FAILED")
            except Exception:  # noqa: BLE001 - the store may be what failed
                pass
            raise
        base = tr.artifact_uri(rid).rstrip("/")
        rec = {"run_id": rid, "entries": {e: {"uri": f"{base}/{e}", "sha256": a.sha256, "bytes": a.bytes} for e, a in arts.items()}}
        self._record_study(create=True).set_user_attr(attr_key(seed), rec)
        tr.set_tags(rid, {"state": "complete"})
        tr.finish(rid)
        self.timings_s["artifacts_publish"] = time.perf_counter() - t0
        self.log(f"model artifacts of {self.study}, seed {seed}: published {len(arts)} entries "
                 f"({sum(a.bytes for a in arts.values()) / 1e6:.1f} MB) to run {rid}")
        return rec


def _remove_entry(cache: Path, entry: str) -> None:
    from ..core.atomic import remove

    remove(cache / entry)


def record_in(study: optuna.Study, model: Model) -> None:
    """Copy a published model's record into an Optuna study a worker runs (once)."""
    if model.record is not None and study.user_attrs.get(attr_key(model.seed)) != model.record:
        study.set_user_attr(attr_key(model.seed), model.record)
