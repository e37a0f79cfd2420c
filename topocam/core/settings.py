"""Every setting of the method, declared once.

Each field of :class:`TopoCAMConfig` carries one :class:`Setting`: its type,
default, bounds or choices, help text, stage, study-file section, default search
range, and whether only a leakage audit may change it. Everything else is
derived from these declarations, never written again:

* the configuration's validation (:meth:`TopoCAMConfig.validated`);
* the ``topocam run`` options (``topocam.cli.options``);
* the study-file schema, with the old key names still read (``search.studyfile``);
* the default search space and its parameter -> setting mapping (``search.space``);
* the keys an ablation arm may set (``search.ablate``).

So adding a setting is one entry here plus the code that uses it. The names a
user sees are the field names everywhere: ``--tau-mode`` on the command line,
``tau_mode`` in a study file's ``[fixed]`` table, an arm and ``[space.tau_mode]``.

Choices dispatched by a stage's own table (the CAM variants, the CAM target rules, the
backbone inits) and the backbone's default training recipe are taken from their owners.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .backbone import DEFAULT_RECIPE, DEVICE_HELP, INITS, check_device
from .cam import CAM_VARIANTS, SEARCHED_CAMS, TARGET_RULES
from .choices import ARMS, BACKBONES, BETTI_BACKENDS, OUTSIDE_MODES
from .errors import TopoCAMError
from .jobs import check_n_jobs
from .prompted import PROMPTERS, SAM_MODELS, PromptRecipe
from .segmenter import SEGMENTER_LOSSES

PROMPT = PromptRecipe()  # the CAM-prompted recipe's constants: their defaults are the recipe's
ROI_GENERATORS: tuple[str, ...] = ("threshold", "prompted", "segmenter")

STAGES = ("data", "backbone", "method", "cam", "roi", "topology", "classifier", "execution")
SECTIONS = ("data", "backbone", "fixed")  # study-file tables that set configuration values
ROI_STAGES = ("cam", "roi")  # what only TopoCAM has: Topo-Original (the whole image) has no CAM and no ROI


@dataclass(frozen=True)
class Range:
    """A default search range of one parameter: [low, high], log-uniform if ``log``."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Search:
    """How a study searches a setting: one Optuna parameter per component
    (``params``; a scalar setting's one parameter is named after it), with a
    default range each (``ranges``; categorical settings search their choices).
    ``default``: in the default space, else a study file adds it with
    ``[space.NAME]``. ``bounds``: the hard limits a study's range must keep, where
    they differ from the setting's (raw fusion weights live in [0, 1], say).
    ``choices``: a categorical setting's default choices, where fewer than it
    allows (a study file may list any allowed one)."""

    ranges: tuple[Range, ...] = ()
    params: tuple[str, ...] = ()
    default: bool = True
    bounds: tuple[float | None, float | None] | None = None
    choices: tuple | None = None


@dataclass(frozen=True)
class Setting:
    """One setting: what it is, where it may be set and how it is searched."""

    default: Any
    help: str
    stage: str
    section: str | None  # the study-file table that sets it (None: a study file cannot)
    type: type = str  # the value's type (a tuple setting's element type)
    length: int | None = None  # None: a scalar; 0: a tuple of any length; k: a tuple of k values
    choices: tuple | None = None
    bounds: tuple[float | None, float | None] | None = None  # inclusive; None: open on that side
    above: float | None = None  # strictly above this (lr > 0)
    search: Search | None = None
    audit_only: tuple = ()  # values only a leakage-audit arm may take (the reference's shortcuts)
    arm: bool = True  # an ablation arm may change it
    cli: bool = True  # a `topocam run` option
    recipe: str | None = None  # its key in the backbone's training recipe (a --preset sets it unless given)
    old_keys: tuple[str, ...] = ()  # study-file names it had before (read with a deprecation notice)
    # a stored study's definition holds it at its default only where studies recorded it from the start
    in_definition_at_default: bool = True
    validator: Callable[[Any], Any] | None = None  # the owner's own check, used instead of the generic one
    name: str = ""  # filled in from the field

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_tuple(self) -> bool:
        return self.length is not None

    @property
    def params(self) -> tuple[str, ...]:
        """The Optuna parameters that stand for this setting in a study."""
        if self.search is None:
            return ()
        return self.search.params or (self.name,)

    @property
    def search_bounds(self) -> tuple[float | None, float | None]:
        if self.search is not None and self.search.bounds is not None:
            return self.search.bounds
        return self.bounds or (None, None)

    def describe_bounds(self) -> str:
        lo, hi = self.bounds or (None, None)
        if self.above is not None:
            return f"> {self.above:g}"
        if lo is not None and hi is not None:
            return f"in [{lo:g}, {hi:g}]"
        return f">= {lo:g}" if lo is not None else f"<= {hi:g}"

    def check(self, value: Any, where: str = "", key: str | None = None) -> Any:
        """``value`` as this setting holds it (tuples as tuples, numbers cast), or a
        TopoCAMError that names ``where`` the value came from, the key as the user wrote
        it (``key``, default the setting's name) and the allowed values."""
        label = f"{where}{key or self.name}"
        if self.validator is not None:
            try:
                return self.validator(value)
            except TopoCAMError as exc:
                raise TopoCAMError(f"{where}{exc}") from None
        if self.default is None and value is None:
            return None
        if self.is_tuple:
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise TopoCAMError(f"{label} must be a list of {self.type.__name__} values, got {value!r}")
            items = tuple(self._scalar(v, label) for v in value)
            if self.length and len(items) != self.length:
                raise TopoCAMError(f"{label} needs {self.length} values, got {list(value)}")
            return items
        return self._scalar(value, label)

    def _scalar(self, v: Any, label: str) -> Any:
        want = self.type
        # numpy's integers and floats count (seeds and sizes come from arrays too)
        ok = isinstance(v, {int: numbers.Integral, float: numbers.Real}.get(want, want))
        if isinstance(v, bool) and want is not bool:
            ok = False
        if not ok:
            raise TopoCAMError(f"{label} must be {_type_name(want)}, got {v!r}")
        if want is int:
            v = int(v)
        if want is float:
            v = float(v)
            if not math.isfinite(v):
                raise TopoCAMError(f"{label} must be a finite number, got {v!r}")
        if self.choices is not None and v not in self.choices:
            raise TopoCAMError(f"{label} must be one of {', '.join(map(str, self.choices))}; got {v!r}")
        lo, hi = self.bounds or (None, None)
        if (lo is not None and v < lo) or (hi is not None and v > hi) or (self.above is not None and v <= self.above):
            raise TopoCAMError(f"{label} must be {self.describe_bounds()}, got {v!r}")
        return v


def _type_name(t: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(t, t.__name__)


def setting(default: Any, help: str, stage: str, section: str | None, **kw: Any) -> Any:
    """A dataclass field declaring a setting (the field's default is the setting's)."""
    s = Setting(default, help, stage, section, **kw)
    return field(default=default, metadata={"setting": s})


MLP_PARAMS = ("mlp_h1", "mlp_h2")
WEIGHT_PARAMS = ("w_layer2", "w_layer3", "w_layer4")


@dataclass(frozen=True)
class TopoCAMConfig:
    """One configuration of y = g(phi(A_{w,tau}(f(X)))): the data, the backbone f, the
    CAMs and ROI A_{w,tau}, the topology phi, the classifier g and how it runs."""

    # data
    dataset: str = setting("breastmnist", "MedMNIST name, synthetic2d, synthetic3d, or path to an .npz or a `topocam data import` folder", "data", "data",
                           arm=False)
    data_dir: str | None = setting(None, "folder holding MedMNIST .npz files (or TOPOCAM_DATA_DIR)", "data", "data",
                                   arm=False)
    size: int = setting(28, "image size (MedMNIST: 28/64/128/224; synthetic: any >= 12)", "data", "data", type=int,
                        bounds=(1, None), arm=False)
    synthetic_n: tuple[int, int, int] = setting((120, 40, 40), "synthetic train,val,test counts", "data", "data",
                                                type=int, length=3, bounds=(2, None), arm=False)
    data_seed: int = setting(0, "synthetic sets: the seed of the images (fixed while the model seeds vary)", "data", "data",
                             type=int, bounds=(0, None), arm=False, old_keys=("seed",))
    clutter: int = setting(2, "synthetic sets: distractor objects per image (difficulty)", "data", "data", type=int,
                           bounds=(1, None), arm=False)
    # backbone (f_theta)
    backbone: str = setting("auto", "auto: resnet18 in 2D, r3d18 in 3D; small: a tiny CNN for tests and demos", "backbone",
                            "backbone", choices=BACKBONES, arm=False, old_keys=("arch",))
    epochs: int = setting(DEFAULT_RECIPE["epochs"], "backbone fine-tuning epochs", "backbone", "backbone", type=int,
                          bounds=(1, None),
                          arm=False, recipe="epochs")
    batch_size: int = setting(DEFAULT_RECIPE["batch_size"], "backbone batch size", "backbone", "backbone", type=int,
                              bounds=(2, None), arm=False,
                              recipe="batch_size")
    lr: float = setting(DEFAULT_RECIPE["lr"], "backbone learning rate (Adam)", "backbone", "backbone", type=float,
                        above=0.0, arm=False,
                        recipe="lr")
    lr_milestones: tuple[int, ...] = setting(DEFAULT_RECIPE["milestones"],
                                             "backbone lr / 10 after these epochs (comma-separated)", "backbone",
                                             "backbone", type=int, length=0, bounds=(1, None), arm=False, recipe="milestones",
                                             old_keys=("milestones",))
    infer_batch: int | None = setting(DEFAULT_RECIPE["infer_batch"], "backbone inference batch (probabilities, "
                                      "embeddings; CAMs at min(64, it)); default: the images TOPOCAM_CHUNK_VOXELS "
                                      "holds, at most 128", "backbone", "backbone", type=int, bounds=(1, None),
                                      arm=False, recipe="infer_batch", in_definition_at_default=False)
    bn_batch: int | None = setting(DEFAULT_RECIPE["bn_batch"], "backbone BatchNorm-recalibration batch; default: "
                                   "the images TOPOCAM_CHUNK_VOXELS holds, at most 128", "backbone", "backbone",
                                   type=int, bounds=(2, None), arm=False, recipe="bn_batch",
                                   in_definition_at_default=False)
    micro_batch: int | None = setting(DEFAULT_RECIPE["micro_batch"], "backbone training micro-batch: a batch's "
                                      "gradients accumulate over parts of at most this many images (BatchNorm "
                                      "normalises each part); default: the whole batch where TOPOCAM_CHUNK_VOXELS "
                                      "holds it, else the images it holds", "backbone", "backbone", type=int,
                                      bounds=(2, None), arm=False, recipe="micro_batch", in_definition_at_default=False)
    amp: bool = setting(DEFAULT_RECIPE["amp"], "automatic mixed precision while fine-tuning the backbone (CUDA only: "
                        "refused where the backbone would train on the CPU)", "backbone", "backbone", type=bool,
                        arm=False, recipe="amp", in_definition_at_default=False)
    device: str = setting("auto", f"where the backbone runs: {DEVICE_HELP}", "backbone", "backbone", arm=False,
                          validator=check_device, in_definition_at_default=False)
    seed: int = setting(0, "model seed (backbone and MLP)", "backbone", "backbone", type=int, bounds=(0, None), arm=False,
                        cli=False)
    init: str = setting("auto", "backbone start: auto (pretrained weights if on disk), pretrained (required), scratch",
                        "backbone", "backbone", choices=INITS, in_definition_at_default=False)
    # method: "topocam" (ROI from the CAMs) or "topo_original" (the same phi and g on the whole image)
    method: str = setting("topocam", "topocam (ROI from the CAMs) or topo_original (the whole image)", "method", None,
                          choices=ARMS, cli=False)
    # ROI and CAMs (A_{w,tau}); the fields' order is the default search space's, which samplers draw in
    weights: tuple[float, float, float] = setting(
        (0.2, 0.3, 0.5), "fusion weights of layer2,layer3,layer4 (normalised to sum 1)", "roi", "fixed", type=float,
        length=3, search=Search((Range(0.0, 1.0),) * 3, WEIGHT_PARAMS, bounds=(0.0, 1.0)))
    tau: float = setting(0.6, "ROI threshold on the fused map, in [0, 1]", "roi", "fixed", type=float, bounds=(0.0, 1.0),
                         search=Search((Range(0.3, 0.9),)))
    tau_mode: str = setting("absolute", "absolute: ROI = M >= tau (paper); relative: M / max(M) >= tau per image", "roi",
                            "fixed", choices=("absolute", "relative"), search=Search(default=False),
                            in_definition_at_default=False)
    cam: str = setting("gradcam", "CAM variant: Grad-CAM, Grad-CAM++, Score-CAM (searched by default), LayerCAM or "
                       "EigenCAM", "cam", "fixed", choices=CAM_VARIANTS, search=Search(choices=SEARCHED_CAMS))
    # the ROI generator (issue 24): "threshold" is A_{w,tau} above; the others replace its mask (the CAMs still prompt)
    roi: str = setting("threshold", "ROI generator: threshold (M >= tau, the paper), prompted (a box and points from M "
                       "prompt a segmenter, see --prompter), segmenter (a U-Net trained on the training split's lesion "
                       "masks; data with masks only)", "roi", "fixed", choices=ROI_GENERATORS,
                       search=Search(default=False), in_definition_at_default=False)
    prompter: str = setting("rw", "roi=prompted: rw (scikit-image random walker, no weights, 2D and 3D) or sam "
                            "(segment-anything with --sam-checkpoint; volumes slice by slice)", "roi", "fixed",
                            choices=PROMPTERS, in_definition_at_default=False)
    sam_checkpoint: str | None = setting(None, "prompter=sam: the SAM or MedSAM checkpoint file (.pth); required, "
                                         "never downloaded", "roi", "fixed", arm=False, in_definition_at_default=False)
    sam_model: str = setting("vit_b", "prompter=sam: the checkpoint's image encoder (vit_b for SAM ViT-B and MedSAM)",
                             "roi", "fixed", choices=SAM_MODELS, arm=False, in_definition_at_default=False)
    prompt_threshold: float = setting(PROMPT.threshold, "roi=prompted: hot region = M >= this times max(M)", "roi",
                                      "fixed", type=float, bounds=(0.0, 1.0), in_definition_at_default=False)
    prompt_padding: float = setting(PROMPT.padding, "roi=prompted: the prompt box's padding, a fraction of the image "
                                    "side", "roi", "fixed", type=float, bounds=(0.0, 1.0), in_definition_at_default=False)
    prompt_points: int = setting(PROMPT.points, "roi=prompted: foreground points at M's highest peaks in the hot region",
                                 "roi", "fixed", type=int, bounds=(1, None), in_definition_at_default=False)
    prompt_tries: int = setting(PROMPT.tries, "roi=prompted: prompts per image (the first as drawn, the others "
                                "perturbed); the segmenter's most confident mask is kept", "roi", "fixed", type=int,
                                bounds=(1, None), in_definition_at_default=False)
    prompt_jitter: float = setting(PROMPT.jitter, "roi=prompted: a perturbed prompt moves its box edges and points by "
                                   "up to this fraction of the side", "roi", "fixed", type=float, bounds=(0.0, 0.5),
                                   in_definition_at_default=False)
    prompt_open: int = setting(PROMPT.open_radius, "roi=prompted: radius (voxels) of the morphological opening of the "
                               "mask (0: none)", "roi", "fixed", type=int, bounds=(0, None), in_definition_at_default=False)
    prompt_close: int = setting(PROMPT.close_radius, "roi=prompted: radius (voxels) of the morphological closing after "
                                "it (0: none)", "roi", "fixed", type=int, bounds=(0, None), in_definition_at_default=False)
    segmenter_loss: str = setting("dice", "roi=segmenter: the U-Net's loss, dice or dice+topo (a persistence-based "
                                  "topology-preserving term)", "roi", "fixed", choices=SEGMENTER_LOSSES,
                                  in_definition_at_default=False)
    cam_target: str = setting("predicted", "the class each CAM explains: predicted (always), or label (leakage audit only)",
                              "cam", None, choices=TARGET_RULES, audit_only=("label",), cli=False)
    # topology (phi)
    outside: str = setting("zero", "zero: outside voxels are 0 (paper); exclude: they never enter the filtration",
                           "topology", "fixed", choices=OUTSIDE_MODES, search=Search(default=False))
    bins: int = setting(50, "number of Betti-curve thresholds", "topology", "fixed", type=int, bounds=(2, None),
                        search=Search((Range(20, 100),), default=False, bounds=(2, 1000)))
    betti_backend: str = setting("fast", "fast (exact, default) or giotto (giotto-tda, the optional extra '.[giotto]')",
                                 "topology", "fixed", choices=BETTI_BACKENDS, arm=False)
    betti_grid: str = setting("train", "one Betti grid fitted on train, or per_image (leakage audit only)", "topology",
                              None, choices=("train", "per_image"), audit_only=("per_image",), cli=False,
                              in_definition_at_default=False)
    # classifier (g_psi)
    head: str = setting("betti", "betti: Betti features; hybrid: Betti features and the backbone's pooled embedding",
                        "classifier", "fixed", choices=("betti", "hybrid"), in_definition_at_default=False)
    mlp_stop: str = setting("inner", "MLP early stopping on an inner split of train, or val (leakage audit only)",
                            "classifier", None, choices=("inner", "val"), audit_only=("val",), cli=False,
                            in_definition_at_default=False)
    mlp: tuple[int, ...] = setting(
        (128, 64), "MLP hidden sizes", "classifier", "fixed", type=int, length=0, bounds=(1, None),
        search=Search((Range(16, 256, log=True), Range(8, 128, log=True)), MLP_PARAMS, bounds=(1, 4096)))
    mlp_lr: float = setting(1e-3, "MLP learning rate (Adam)", "classifier", "fixed", type=float, above=0.0,
                            search=Search((Range(1e-4, 1e-2, log=True),), default=False, bounds=(1e-6, 1.0)))
    mlp_weight_decay: float = setting(0.0, "MLP weight decay", "classifier", "fixed", type=float, bounds=(0.0, None),
                                      search=Search((Range(1e-6, 1e-2, log=True),), default=False, bounds=(0.0, 1.0)))
    # execution
    n_jobs: int = setting(-1, "worker threads for Betti curves (-1: all cores, N >= 1: N threads)", "execution", "fixed",
                          type=int, arm=False, validator=check_n_jobs)
    cache_dir: str | None = setting(None, "checkpoint and CAM cache (or TOPOCAM_CACHE_DIR; default ~/.cache/topocam)",
                                    "execution", None, arm=False)

    def validated(self) -> "TopoCAMConfig":
        """Check every setting early (before any training), each against its declaration,
        then the checks that need a library or several settings; a clear message each."""
        for s in SETTINGS.values():
            s.check(getattr(self, s.name))
        from .backbone import check_cache_dir
        from .data import check_dataset
        from .memory import chunk_voxels
        from .roi import fusion_weights, upsampled_cache_bytes
        from .topology import check_backend

        fusion_weights(self.weights)
        check_backend(self.betti_backend)
        check_dataset(self.dataset, self.size)
        check_cache_dir(self.cache_dir)
        upsampled_cache_bytes()  # TOPOCAM_ROI_CACHE_MB: a bad value fails here, not after training
        chunk_voxels()  # TOPOCAM_CHUNK_VOXELS: likewise
        self.mlp_settings()  # one hidden layer at least
        self.check_roi_generator()
        return self

    def check_roi_generator(self) -> None:
        """roi=prompted with the sam prompter needs its checkpoint, named now (never a fallback)."""
        if self.roi == "prompted" and self.prompter == "sam":
            if not self.sam_checkpoint:
                raise TopoCAMError("prompter=sam needs sam_checkpoint (--sam-checkpoint FILE: SAM ViT-B or MedSAM "
                                   "weights); or use --prompter rw, which needs no weights")
            from pathlib import Path

            if not Path(self.sam_checkpoint).expanduser().is_file():
                raise TopoCAMError(f"sam_checkpoint {self.sam_checkpoint} is not a file; give the SAM ViT-B or MedSAM "
                                   "weights (.pth)")

    def prompt_recipe(self) -> PromptRecipe:
        return PromptRecipe(self.prompt_threshold, self.prompt_padding, self.prompt_points, self.prompt_tries,
                            self.prompt_jitter, self.prompt_open, self.prompt_close)

    @property
    def leaks(self) -> tuple[str, ...]:
        """The reference implementation's shortcuts this configuration takes (DESIGN.md §2);
        non-empty only for the leakage audit's arms, whose numbers are invalid by design."""
        return tuple(f"{s.name}={getattr(self, s.name)}" for s in SETTINGS.values() if getattr(self, s.name) in s.audit_only)

    def train_settings(self):
        from .backbone import TrainSettings

        return TrainSettings(arch=self.backbone, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                             milestones=tuple(int(m) for m in self.lr_milestones), init=self.init,
                             infer_batch=self.infer_batch, bn_batch=self.bn_batch, micro_batch=self.micro_batch,
                             amp=self.amp)

    def mlp_settings(self):
        from .classifier import MLPSettings

        return MLPSettings(hidden=tuple(int(h) for h in self.mlp), lr=self.mlp_lr, weight_decay=self.mlp_weight_decay)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


SETTINGS: dict[str, Setting] = {
    f.name: dataclasses.replace(f.metadata["setting"], name=f.name) for f in dataclasses.fields(TopoCAMConfig)
}


def in_section(section: str) -> dict[str, Setting]:
    """The settings a study file's ``[section]`` table sets."""
    return {n: s for n, s in SETTINGS.items() if s.section == section}


def old_keys(section: str) -> dict[str, str]:
    """``[section]``'s old key names -> the setting each now is."""
    return {old: n for n, s in in_section(section).items() for old in s.old_keys}


def searchable() -> dict[str, Setting]:
    return {n: s for n, s in SETTINGS.items() if s.search is not None}


def arm_settings() -> dict[str, Setting]:
    """The settings an ablation arm may change."""
    return {n: s for n, s in SETTINGS.items() if s.arm}


def recipe_settings() -> dict[str, Setting]:
    """The settings of the backbone's training recipe, by their recipe key."""
    return {s.recipe: s for s in SETTINGS.values() if s.recipe}


def run_options() -> dict[str, Setting]:
    """The settings ``topocam run`` takes as options."""
    return {n: s for n, s in SETTINGS.items() if s.cli}


def assemble(name: str, values: Sequence[Any]) -> Any:
    """The value of setting ``name`` from its parameters' values (in ``params`` order).
    Raw fusion weights that are all zero become equal weights (a defined point, not a
    failed trial); other tuples are their parameters; a scalar is its one parameter."""
    s = SETTINGS[name]
    cast: Callable[[Any], Any] = s.type if s.type in (int, float) else (lambda v: v)
    if not s.is_tuple:
        return cast(values[0])
    out = tuple(cast(v) for v in values)
    if name == "weights" and sum(out) <= 0:
        return (1.0, 1.0, 1.0)
    return out
