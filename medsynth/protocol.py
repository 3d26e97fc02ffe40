"""Study protocols: a YAML file validated by pydantic, with ``--set`` overrides and a stable hash.

Every section forbids unknown keys, and every ``kind:`` is a closed set, so a typo fails at load
time with the valid choices and the file/line where it stands. Knob names match the keyword
arguments of the functions they feed (EDM's convention), with units in the name.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from medsynth.protocol_edit import MASK_PATTERN, EditSection, Precision, precision_field


def _class_scale(v: float | list[float]) -> float | list[float]:
    """A class's guidance scale (>= 0), or a set of two or more distinct ones, kept sorted (the
    order means nothing, so it changes no hash and no image)."""
    values = v if isinstance(v, list) else [v]
    if any(x < 0 for x in values):
        raise ValueError(f"guidance scales must be >= 0, got {v}")
    if not isinstance(v, list):
        return v
    if len(v) < 2:
        raise ValueError(f"a set of guidance scales needs two or more values, got {v}")
    if len(set(v)) != len(v):
        raise ValueError(f"a set of guidance scales lists a value twice: {v}")
    return sorted(v)


ClassScale = float | list[float]  # one scale, or a set each image picks from by its seed
CheckedClassScale = Annotated[ClassScale, AfterValidator(_class_scale)]


def scale_values(scale: ClassScale) -> list[float]:
    """The scales a class's images are drawn at: ``[scale]``, or the set itself."""
    return list(scale) if isinstance(scale, list | tuple) else [float(scale)]


def class_scale_values(class_scales: dict[str, ClassScale]) -> list[float]:
    """Every scale some class of ``class_scales`` is drawn at, sets unrolled."""
    return [x for v in class_scales.values() for x in scale_values(v)]


def format_scale(scale: ClassScale, sep: str = "|") -> str:
    """``2``, or a set as ``1.5|2.5`` (``sep`` between its scales)."""
    return sep.join(f"{x:g}" for x in scale_values(scale))


class ProtocolError(ValueError):
    """A protocol that cannot be loaded; the message says where and what is valid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True, validate_default=True)


# --- dataset -------------------------------------------------------------------------------


class DatasetKind(str, Enum):
    dicom_folder = "dicom_folder"  # a user's folder of DICOM files plus a label table
    phantoms = "phantoms"  # the embedded synthetic chest-radiograph phantoms (written first)


class IntensityMode(str, Enum):
    bits = "bits"  # full stored-bit range after the Modality LUT -> [-1, 1] (lossless for 8 bit)
    percentile = "percentile"  # per image: [lower_percentile, upper_percentile] -> [-1, 1]
    window = "window"  # fixed window_center / window_width (modality units) -> [-1, 1]
    dicom_window = "dicom_window"  # the file's own first VOI window (WindowCenter/Width)


class ColorMode(str, Enum):
    grey = "grey"  # RGB converted to one luminance channel (ITU-R BT.601 weights)
    rgb = "rgb"  # keep three channels; grey images are repeated to three


class MultiFramePolicy(str, Enum):
    skip = "skip"  # list multi-frame files in skipped.csv
    first = "first"
    middle = "middle"


class ResizeMode(str, Enum):
    pad = "pad"  # keep aspect ratio, resize the long side, pad the short side with the minimum
    stretch = "stretch"  # resize both sides to spatial_size, aspect ratio not kept
    crop = "crop"  # keep aspect ratio, resize the short side, centre-crop the long side


class PhantomBodyPart(str, Enum):
    chest = "chest"  # grey chest-radiograph phantoms (Modality CR, 12 bit)
    fundus = "fundus"  # RGB colour fundus photographs (Modality OP, 8 bit); use color: rgb


class DuplicatePolicy(str, Enum):
    keep = "keep"  # evaluate on every held-out image; warn how many have a near-duplicate in train
    drop = "drop"  # leave val/test images with a near-duplicate in train out of evaluation
    fail = "fail"  # stop the ingest (duplicates.csv is written first, to inspect)


class PhantomSettings(_Section):
    """Settings of the embedded phantom dataset (``dataset.kind: phantoms``)."""

    n_patients: int = Field(160, ge=4, description="patients; ~25 % have a second study")
    num_classes: int = Field(2, ge=2, le=5, description="normal + up to 4 findings")
    size_px: int = Field(128, ge=32, le=1024, description="written image side in pixels")
    difficulty: float = Field(0.6, ge=0.0, le=1.0, description="0 obvious findings, 1 invisible")
    seed: int = 0
    body_part: PhantomBodyPart = PhantomBodyPart.chest


class DatasetSection(_Section):
    kind: DatasetKind = DatasetKind.dicom_folder
    root: str | None = Field(None, description="folder scanned recursively for DICOM files")
    labels_csv: str | None = Field(
        None, description="label table; relative paths resolve from root"
    )
    join_attribute: str = Field("SOPInstanceUID", description="DICOM keyword the table is keyed by")
    join_column: str | None = Field(None, description="table column for join_attribute (same name)")
    label_column: str = "label"
    classes: list[str] | None = Field(None, description="class names in index order; None = sorted")
    split_column: str | None = Field(
        None, description="table column with train/val/test; None = compute"
    )
    split_values: dict[str, str] = Field(
        default_factory=lambda: {"train": "train", "val": "val", "test": "test"},
        description="our split name -> value used in split_column",
    )
    split_fractions: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15}
    )
    split_seed: int = 0
    split_stratify: list[str] = Field(
        default_factory=list,
        description="header keywords recorded in ingest/index.csv (e.g. ViewPosition) that "
        "computed splits are stratified by, besides the label",
    )
    train_fraction: float = Field(1.0, gt=0, le=1, description="patient-level share of train used")
    fraction_seed: int = 0
    spatial_size: int = Field(32, ge=8, le=1024, description="cached image side in pixels")
    resize_mode: ResizeMode = ResizeMode.pad
    intensity: IntensityMode = IntensityMode.percentile
    lower_percentile: float = Field(0.5, ge=0, le=100)
    upper_percentile: float = Field(99.5, ge=0, le=100)
    window_center: float | None = None
    window_width: float | None = Field(None, gt=0)
    color: ColorMode = ColorMode.grey
    multiframe: MultiFramePolicy = MultiFramePolicy.skip
    max_pixels: int = Field(
        8192 * 8192,
        ge=0,
        description="largest Rows x Columns x frames x samples decoded (0 = no limit); "
        "larger files are skipped from their header, before decoding",
    )
    workers: int = Field(2, ge=1, description="decoding processes")
    duplicate_threshold: float = Field(
        0.99, gt=0, le=1, description="pixel correlation at cache resolution = near-duplicate"
    )
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.keep
    phantoms: PhantomSettings = Field(default_factory=PhantomSettings)

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != {"train", "val", "test"}:
            raise ValueError(f"split_fractions needs exactly train, val, test; got {sorted(v)}")
        if any(f < 0 for f in v.values()) or abs(sum(v.values()) - 1) > 1e-6:
            raise ValueError(f"split_fractions must be >= 0 and sum to 1; got {v}")
        return v

    @model_validator(mode="after")
    def _needs(self) -> DatasetSection:
        if self.kind == DatasetKind.dicom_folder.value and (not self.root or not self.labels_csv):
            raise ValueError(
                "dataset.kind 'dicom_folder' needs dataset.root and dataset.labels_csv"
            )
        if self.intensity == IntensityMode.window.value and (
            self.window_center is None or self.window_width is None
        ):
            raise ValueError("intensity 'window' needs window_center and window_width")
        if self.lower_percentile >= self.upper_percentile:
            raise ValueError("lower_percentile must be below upper_percentile")
        return self


# --- model / schedule / training / generation / evaluation ------------------------------------


class ModelKind(str, Enum):
    monai_unet = "monai_unet"  # the UNet denoises pixels at dataset.spatial_size
    monai_ldm = "monai_ldm"  # an AutoencoderKL trained in-run first; the UNet denoises latents


class AutoencoderSection(_Section):
    """The in-run AutoencoderKL of ``model.kind: monai_ldm`` (architecture and its training)."""

    channels: list[int] = Field(
        default_factory=lambda: [32, 64, 64],
        min_length=2,
        description="one level each; the image shrinks 2 ** (levels - 1) into the latent",
    )
    latent_channels: int = Field(4, ge=1)
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    attention: bool = Field(False, description="bottleneck self-attention (memory ~ (H*W)^2)")
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(50, ge=0)
    patch_px: int | None = Field(
        None,
        ge=8,
        description="train on random square crops of this side (None = whole images); the "
        "network is convolutional, so it still encodes whole images (on a CPU at 256 px, "
        "64 px crops cost half the time per pixel and let a step see 16x more images)",
    )
    ssim_weight: float = Field(0.5, ge=0, description="weight of 1 - SSIM next to L1")
    kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term")
    checkpoint_every_steps: int = Field(250, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _groups(self) -> AutoencoderSection:
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(
                "every model.autoencoder.channels entry must be divisible by norm_num_groups"
            )
        if self.patch_px is not None and self.patch_px % self.downsample:
            raise ValueError(
                f"model.autoencoder.patch_px {self.patch_px} must be divisible by the "
                f"downsampling {self.downsample} (2 ** (len(channels) - 1))"
            )
        return self

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)


class ModelSection(_Section):
    kind: ModelKind = ModelKind.monai_unet
    channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    attention_levels: list[bool] = Field(default_factory=lambda: [False, False, True])
    num_res_blocks: int = Field(1, ge=1)
    num_head_channels: int = Field(32, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    embedding_injection: Literal["add", "scale_shift"] = Field(
        "add",
        description="how the time + class embedding enters each residual block: 'add' (MONAI's "
        "bias before the block's second GroupNorm) or 'scale_shift' (ADM's AdaGN after it)",
    )
    autoencoder: AutoencoderSection = Field(
        default_factory=AutoencoderSection, description="only for kind monai_ldm"
    )

    @model_validator(mode="after")
    def _lengths(self) -> ModelSection:
        if len(self.channels) != len(self.attention_levels):
            raise ValueError("model.channels and model.attention_levels need the same length")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError("every model.channels entry must be divisible by norm_num_groups")
        return self


class ScheduleSection(_Section):
    kind: Literal["ddpm", "rflow"] = "ddpm"
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear_beta", "scaled_linear_beta", "cosine"] = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"


class AdapterKind(str, Enum):
    full = "full"  # fine-tune every weight of the base
    lora = "lora"  # train low-rank adapters (and the class embedding); the base stays frozen


class LoraTarget(str, Enum):
    attention = "attention"  # to_q, to_k, to_v, out_proj of every attention block
    conv = "conv"  # conv1, conv2 of every residual block
    time = "time"  # the per-block projection of the time embedding


class AdapterSection(_Section):
    """How a run that starts from ``training.init_from`` adapts the base (ignored without it)."""

    kind: AdapterKind = AdapterKind.full
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(8.0, gt=0, description="LoRA scale numerator: delta = alpha / r * B A")
    targets: list[LoraTarget] = Field(
        default_factory=lambda: [LoraTarget.attention, LoraTarget.conv],
        min_length=1,
        description="layer groups that get adapters",
    )


class LossWeighting(str, Enum):
    uniform = "uniform"  # plain MSE: every timestep counts the same
    min_snr = "min_snr"  # Min-SNR-gamma (Hang et al. 2023): low-noise steps clipped to gamma


class ClassBalance(str, Enum):
    none = "none"  # draw training images uniformly: classes as often as they occur
    balanced = "balanced"  # every class equally likely per draw
    sqrt = "sqrt"  # class probability proportional to sqrt(its image count)


class TrainingSection(_Section):
    max_steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch (summed over processes)")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = 0.0
    warmup_steps: int = Field(100, ge=0)
    grad_clip_norm: float = Field(1.0, gt=0)
    ema_halflife_steps: float = Field(200.0, gt=0)
    label_dropout: float = Field(0.15, ge=0, lt=1, description="share of null-class labels (CFG)")
    precision: Precision = precision_field("fp32")
    augment_hflip: bool = Field(False, description="horizontal flips (off: chest anatomy is sided)")
    augment_shift_px: int = Field(0, ge=0, description="random integer shift, reflect padding")
    checkpoint_every_steps: int = Field(500, ge=1)
    keep_states: int = Field(2, ge=1)
    preview_every_steps: int = Field(0, ge=0, description="0 = only at the end")
    log_every_steps: int = Field(10, ge=1)
    max_nonfinite_steps: int = Field(5, ge=1, description="consecutive NaN/inf losses before stop")
    seed: int = 0
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto = cuda if present"
    )
    init_from: str | None = Field(
        None, description="base snapshot, train folder or run folder (glob allowed) to adapt"
    )
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    unconditional: bool = Field(False, description="null class only (e.g. base pretraining)")
    loss_weighting: LossWeighting = Field(
        LossWeighting.uniform, description="per-sample loss weight over timesteps"
    )
    min_snr_gamma: float = Field(5.0, gt=0, description="SNR clip of loss_weighting min_snr")
    class_balance: ClassBalance = Field(
        ClassBalance.none, description="how training batches draw classes"
    )
    guide_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="also train a guide for autoguidance (generation.autoguidance): this "
        "recipe for this fraction of max_steps, its LR decaying by then (0 = no guide); "
        "RUN/train/guide",
    )

    @property
    def guide_steps(self) -> int:
        """Training steps of the autoguidance guide (0: none)."""
        return max(1, round(self.guide_fraction * self.max_steps)) if self.guide_fraction else 0

    @model_validator(mode="after")
    def _guide_is_weaker(self) -> TrainingSection:
        if not self.guide_fraction:
            return self
        steps = f"training.guide_fraction {self.guide_fraction:g} of max_steps {self.max_steps} "
        steps += f"gives the guide {self.guide_steps} steps"
        if self.guide_steps >= self.max_steps:
            raise ValueError(f"{steps}; a guide trains for fewer than the model")
        if self.guide_steps <= self.warmup_steps:
            raise ValueError(
                f"{steps}, within warmup_steps {self.warmup_steps}: its learning rate would "
                "never decay; raise guide_fraction or set it to 0"
            )
        if self.unconditional:
            raise ValueError(
                "training.guide_fraction: an unconditional model has no use for a guide"
            )
        return self


class DistillSection(_Section):
    """``medsynth distill``: consistency distillation of the trained model (1-4 step sampler)."""

    max_steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0)
    grad_clip_norm: float = Field(1.0, gt=0)
    guidance_scale: float = Field(
        1.0, ge=0, description="teacher guidance distilled in (the generation default)"
    )
    solver_steps: int = Field(50, ge=2, description="teacher DDIM grid (divides T)")
    target_ema_halflife_steps: float = Field(13.5, gt=0, description="target network EMA")
    huber_c: float = Field(0.001, gt=0, description="pseudo-Huber loss constant")
    huber_over: Literal["pixel", "image"] = Field(
        "pixel",
        description="pseudo-Huber per pixel (LCM; L1-like) or on each image's RMS error (iCT-style)",
    )
    checkpoint_every_steps: int = Field(500, ge=1)
    keep_states: int = Field(2, ge=1)
    log_every_steps: int = Field(10, ge=1)
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")


class CountMode(str, Enum):
    per_class = "per_class"  # per_class images of every class (counts overrides single classes)
    ratio = "ratio"  # ratio x the real training images of each class
    balance = "balance"  # top every class up to ratio x the largest real class


# Sampler vocabulary shared by the protocol and the samplers (level 0, so both can import it).
SPACINGS = ("trailing", "karras")  # generation.timestep_spacing
GRID_SAMPLERS = ("ddim", "ddpm", "dpmpp")  # the samplers that step over one of those grids


class GenerationSection(_Section):
    pool: str = Field("main", pattern=r"^[A-Za-z0-9_.-]+$", description="pool name (folder, seeds)")
    count_mode: CountMode = CountMode.per_class
    per_class: int = Field(100, ge=0)
    counts: dict[str, int] = Field(default_factory=dict, description="class name -> count")
    ratio: float = Field(1.0, ge=0)
    sampler: Literal["ddpm", "ddim", "dpmpp", "euler", "distilled"] = Field(
        "dpmpp", description="distilled: the student of `medsynth distill` (RUN/distill)"
    )
    steps: int = Field(20, ge=1)
    # 1.0 = conditional only. Guidance 2-3 stereotyped the classes and raised FD_clf 4-15x on
    # PneumoniaMNIST (docs/results.md, "Generator quality per class"); sweeps vary it.
    guidance_scale: float = Field(1.0, ge=0)
    ddim_eta: float = Field(
        0.0, ge=0, le=1, description="DDIM stochasticity: 0 deterministic, 1 DDPM-like"
    )
    guidance_rescale: float = Field(
        0.0, ge=0, le=1, description="rescaled CFG mix phi (Lin et al. 2024); 0 = plain CFG"
    )
    guidance_interval: list[float] = Field(
        default_factory=lambda: [0.0, 1.0],
        description="[lo, hi] share of the timestep range where guidance applies; "
        "conditional-only elsewhere (Kynkaanniemi et al. 2024)",
    )
    class_guidance: dict[str, CheckedClassScale] = Field(
        default_factory=dict,
        description="class name -> guidance scale for that class's images (the others take "
        "guidance_scale); one class may need stronger conditioning than another. A list of "
        "scales: each image of the class takes one of them, picked by its seed (a spread of "
        "class strength that one scale cannot give)",
    )
    autoguidance: bool | list[str] = Field(
        False,
        description="guide with the weaker model of training.guide_fraction under each image's "
        "own class instead of the null class (Karras et al. 2024); guidance_scale sets it. "
        "A list of class names: only those classes' guided images use the guide, the other "
        "guided classes push away from the null class",
    )
    timestep_spacing: Literal["trailing", "karras"] = Field(
        "trailing",
        description="ddim/ddpm/dpmpp timestep grid: trailing (even in t, last call at "
        "T / steps - 1) or karras (EDM's sigma spacing, most calls at low noise, last at t = 0)",
    )
    batch_size: int = Field(64, ge=1, description="samples per write batch")
    net_batch: int = Field(16, ge=1, description="rows per network call; part of sample identity")
    precision: Precision = precision_field("fp32")
    export_png: bool = Field(False, description="also write 16-bit PNGs beside the DICOM")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")

    @property
    def guided(self) -> bool:
        """Whether some class takes a second pass per step (see :func:`is_guided`)."""
        return is_guided(self.guidance_scale, class_scale_values(self.class_guidance))

    @property
    def autoguided_classes(self) -> list[str] | None:
        """The classes whose guided images use the guide: None for all (``true``), [] for none."""
        a = self.autoguidance
        return (None if a else []) if isinstance(a, bool) else a

    @property
    def uses_guide(self) -> bool:
        """Whether some image is drawn with the guide: an autoguided class at a scale other
        than 1 (the guide is never called otherwise)."""
        return guide_called(self.autoguidance, self.guidance_scale, self.class_guidance)

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, v: list[float]) -> list[float]:
        return check_interval(v)

    @field_validator("counts", "class_guidance", mode="before")
    @classmethod
    def _class_keys(cls, v: Any) -> Any:
        return class_name_keys(v)

    @field_validator("autoguidance", mode="before")
    @classmethod
    def _class_list(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            names = [str(c) for c in v]  # bare YAML class names (`[1]`) read as numbers
            if not names:
                raise ValueError("an empty list autoguides no class: use false")
            if len(set(names)) != len(names):
                raise ValueError(f"names a class twice: {names}")
            return sorted(names)  # a set: the order means nothing, so it changes no hash
        return v

    @model_validator(mode="after")
    def _knobs_fit_the_sampler(self) -> GenerationSection:
        low = autoguidance_below_one(
            self.guidance_scale, self.class_guidance, self.autoguided_classes
        )
        if self.autoguidance and low:
            raise ValueError(f"generation.{low}")
        for key, off in (("class_guidance", "{}"), ("autoguidance", "false")):
            if getattr(self, key) and self.sampler == "distilled":
                raise ValueError(
                    f"generation.{key} does not apply to the distilled sampler: its "
                    f"guidance is distilled into the student (--set generation.{key}={off})"
                )
        if self.timestep_spacing != "trailing" and self.sampler not in GRID_SAMPLERS:
            raise ValueError(
                f"generation.timestep_spacing {self.timestep_spacing!r} applies to the samplers "
                f"{', '.join(GRID_SAMPLERS)}; {self.sampler!r} keeps its own grid"
            )
        return self


def is_guided(guidance_scale: float, class_scales: Iterable[float] = ()) -> bool:
    """Whether any class is sampled at a scale other than 1, i.e. takes a second network pass
    (null class or guide); at 1 everywhere the guide of autoguidance is never called."""
    return guidance_scale != 1 or any(v != 1 for v in class_scales)


def guide_called(
    autoguidance: bool | list[str], guidance_scale: float, class_scales: dict[str, ClassScale]
) -> bool:
    """Whether autoguidance (``true``, or the classes it names) calls the guide for some row:
    an autoguided class sampled at a scale other than 1."""
    if isinstance(autoguidance, bool):
        return autoguidance and is_guided(guidance_scale, class_scale_values(class_scales))
    scales = class_scale_values({c: class_scales.get(c, guidance_scale) for c in autoguidance})
    return any(v != 1 for v in scales)


def autoguidance_below_one(
    guidance_scale: float, class_scales: dict[str, ClassScale], classes: list[str] | None = None
) -> str | None:
    """Why autoguidance at these scales is refused, or None: below 1 a row would move *towards*
    the guide (a weaker model) instead of away from it; 1 leaves a row unguided. ``classes``:
    the autoguided classes (None: all)."""

    def below_one(scale: ClassScale) -> bool:
        return min(scale_values(scale)) < 1

    if classes is None:
        low = [f"guidance_scale {guidance_scale:g}"] if below_one(guidance_scale) else []
        items = sorted(class_scales.items())
        low += [f"class_guidance {c}: {format_scale(v)}" for c, v in items if below_one(v)]
    else:
        scales = {c: class_scales.get(c, guidance_scale) for c in classes}
        low = [f"{c} at {format_scale(v)}" for c, v in scales.items() if below_one(v)]
    if not low:
        return None
    return (
        f"autoguidance extrapolates away from the guide: {', '.join(low)} below 1 would move "
        "towards it (1 = unguided)"
    )


def class_name_keys(v: Any) -> Any:
    """A dict's keys as str: YAML reads the class names of ``classes: ["0", "1"]`` written bare
    (``{1: 2}``) as numbers."""
    if isinstance(v, dict):
        return {str(k): x for k, x in v.items()}
    return v


def check_interval(v: list[float]) -> list[float]:
    """``[lo, hi]`` with ``0 <= lo < hi <= 1``, else a ValueError saying so."""
    if len(v) != 2 or not 0 <= v[0] < v[1] <= 1:
        raise ValueError(f"guidance_interval must be [lo, hi] with 0 <= lo < hi <= 1; got {v}")
    return [float(x) for x in v]


class Arm(str, Enum):
    real_only = "real_only"  # the baseline every arm is compared with
    duplicate_control = "duplicate_control"  # real + count-matched duplicates of real images
    classical_aug = "classical_aug"  # real with shifts, rotations, contrast
    synthetic = "synthetic"  # real + synthetic at each ratio, pool and selector
    synthetic_only = "synthetic_only"  # train on synthetic, test on real
    variations = "variations"  # real + same-class edits of an edited pool (medsynth edit)
    counterfactual = "counterfactual"  # real + class-changing edits of an edited pool


# The arms a study runs unless it names some; the edit arms need an edited pool, so they are
# opt-in (and leaving them out keeps the hash of every protocol written before they existed).
DEFAULT_ARMS = ["real_only", "duplicate_control", "classical_aug", "synthetic", "synthetic_only"]


class ClassifierSection(_Section):
    kind: Literal["small_cnn", "resnet18"] = "small_cnn"
    width: float = Field(1.0, gt=0, description="channel multiplier")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    precision: Precision = precision_field("auto")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")


class EvaluationSection(_Section):
    classifier: ClassifierSection = Field(default_factory=ClassifierSection)
    seeds: int = Field(5, ge=1, description="classifier seeds per arm")
    arms: list[Arm] = Field(default_factory=lambda: list(DEFAULT_ARMS))
    ratios: list[float] = Field(
        default_factory=lambda: [0.5, 1.0], description="synthetic per real"
    )
    pools: list[str] = Field(
        default_factory=lambda: ["main"], description="generated pools to test"
    )
    selectors: list[Literal["random", "kcenter", "fidelity"]] = Field(
        default_factory=lambda: ["random"]
    )
    class_mix: Literal["proportional", "balanced", "minority_topup"] = Field(
        "proportional",
        description="extra images per class: as the real classes, equal, or filling the "
        "smaller classes first (minority top-up)",
    )
    bootstrap: int = Field(1000, ge=100)
    metric_samples: int = Field(2000, ge=10, description="max images per set for fidelity metrics")
    memorization_quantile: float = Field(0.99, gt=0.5, lt=1)


class RuntimeSection(_Section):
    """How to compute, not what: left out of the protocol hash and every stage's inputs."""

    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch; None = $OMP_NUM_THREADS, else every available CPU "
        "(a bit-identical resume needs the same count)",
    )


# Knobs that change speed, never results: not part of the protocol's identity (sha256), so a
# resume with another batch size or thread count is the same study.
PERFORMANCE_ONLY = {"dataset": ("workers",), "generation": ("batch_size",)}

# Knobs added after studies were run, with the value that reproduces the older behaviour: left
# out of every hash while at that value, so existing run folders and pools stay valid.
LATER_KNOBS = {
    "training": {
        "loss_weighting": "uniform",
        "min_snr_gamma": 5.0,
        "class_balance": "none",
        "guide_fraction": 0.0,
    },
    "generation": {
        "guidance_rescale": 0.0,
        "guidance_interval": [0.0, 1.0],
        "timestep_spacing": "trailing",
        "class_guidance": {},
        "autoguidance": False,
    },
    "sweep": {
        "guidance_rescale": [],
        "guidance_interval": [],
        "class_guidance": [],
        "autoguidance": [],
    },
    "model": {"embedding_injection": "add"},
    "model.autoencoder": {"patch_px": None},
    "upscaler": {"chain_per_class": None},
    "distill": {"huber_over": "pixel"},
}


# Samplers whose pixels changed after pools were made with them. The revision joins a pool's
# request, its derivation and its stage hash, so an older pool is regenerated, never resumed
# into or mixed. Revision 2 steps over `diffusion.timesteps.trailing_timesteps`. Before it,
# ddim stepped a fixed T // n over MONAI's linspace(T - 1, 0, n) grid (the image noisier than
# the level the network was told: residual noise of sigma ~0.14 at 10 steps) and ddpm made
# n + 1 calls when n does not divide T; ddpm with n dividing T is unchanged (same hashes).
def sampler_revision(sampler: str, steps: int, num_train_timesteps: int) -> dict:
    """``{"sampler_revision": 2}`` where revision 2 changed the pixels, else ``{}``."""
    changed = sampler == "ddim" or (sampler == "ddpm" and num_train_timesteps % steps != 0)
    return {"sampler_revision": 2} if changed else {}


def drop_later_defaults(data: dict, prefix: str = "") -> dict:
    """Remove the ``LATER_KNOBS`` that hold their old-behaviour value from dumped sections.

    ``data``: a dumped protocol, or (with ``prefix``, e.g. ``"model.autoencoder"``) the dump of
    that one section. Section paths are dotted (``model.autoencoder``).
    """
    for path, knobs in LATER_KNOBS.items():
        if prefix and path != prefix:
            continue
        sec = data
        for part in [] if prefix else path.split("."):
            sec = sec.get(part) if isinstance(sec, dict) else None
        if isinstance(sec, dict):
            for key, default in knobs.items():
                if key in sec and sec[key] == default:
                    del sec[key]
    return data


class SamplerSetting(_Section):
    """One sampler configuration of a sweep (the generation keys of the same names)."""

    sampler: Literal["ddpm", "ddim", "dpmpp", "euler"] = "dpmpp"
    steps: int = Field(20, ge=1)
    ddim_eta: float = Field(0.0, ge=0, le=1, description="only for sampler ddim")

    @model_validator(mode="after")
    def _eta(self) -> SamplerSetting:
        if self.ddim_eta and self.sampler != "ddim":
            raise ValueError(f"ddim_eta applies to sampler 'ddim' only, not {self.sampler!r}")
        return self


class SweepSection(_Section):
    """Values to sweep; an empty list keeps the single value of the section it overrides.

    Every combination (a grid) of the generation knobs is one pool per train fraction, generated
    once; every combination of the evaluation knobs is evaluated on every pool.
    """

    train_fractions: list[float] = Field(
        default_factory=list, description="dataset.train_fraction values; one generator each"
    )
    guidance_scale: list[float] = Field(default_factory=list, description="generation values")
    guidance_rescale: list[float] = Field(
        default_factory=list, description="generation.guidance_rescale values, each in [0, 1]"
    )
    guidance_interval: list[list[float]] = Field(
        default_factory=list, description="generation.guidance_interval values, each [lo, hi]"
    )
    class_guidance: list[dict[str, NonNegativeFloat]] = Field(
        default_factory=list,
        description="generation.class_guidance values, each {class name: scale}; {} = "
        "guidance_scale for every class",
    )
    autoguidance: list[bool] = Field(
        default_factory=list,
        description="generation.autoguidance values; an unguided pool is drawn once",
    )
    samplers: list[SamplerSetting] = Field(default_factory=list, description="sampler+steps+eta")
    pool_size: list[float] = Field(
        default_factory=list,
        description="images generated per class, as a multiple of the largest real class",
    )
    selectors: list[Literal["random", "kcenter", "fidelity"]] = Field(default_factory=list)
    ratios: list[float] = Field(default_factory=list, description="synthetic per real image")
    class_mix: list[Literal["proportional", "balanced", "minority_topup"]] = Field(
        default_factory=list
    )
    curve_fractions: list[float] = Field(
        default_factory=list,
        description="extra train fractions for the low-data curve, run with curve_pools only",
    )
    curve_pools: list[str] = Field(
        default_factory=list,
        description="pool names (as --dry-run lists them) to run at curve_fractions; "
        "chosen before seeing results. Empty = every pool",
    )
    curve_selectors: list[Literal["random", "kcenter", "fidelity"]] = Field(
        default_factory=list, description="selectors at curve_fractions; empty = selectors"
    )
    # Defaults: 2-core CPU, 28 px, default model (docs/benchmarks.md, PneumoniaMNIST study).
    seconds_per_train_step: float = Field(0.38, gt=0, description="for --dry-run estimates")
    seconds_per_image_step: float = Field(
        0.0037, gt=0, description="one network call for one image (for estimates)"
    )
    seconds_per_fit_image_epoch: float = Field(
        0.0024, gt=0, description="one classifier epoch over one image (for estimates)"
    )

    @field_validator("train_fractions", "curve_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0 < f <= 1]
        if bad:
            raise ValueError(f"train_fractions must lie in (0, 1]; got {bad}")
        return v

    @field_validator("guidance_rescale")
    @classmethod
    def _unit(cls, v: list[float]) -> list[float]:
        if any(not 0 <= x <= 1 for x in v):
            raise ValueError(f"guidance_rescale values must lie in [0, 1]; got {v}")
        return v

    @field_validator("guidance_interval")
    @classmethod
    def _intervals(cls, v: list[list[float]]) -> list[list[float]]:
        return [check_interval(i) for i in v]

    @field_validator("class_guidance", mode="before")
    @classmethod
    def _class_keys(cls, v: Any) -> Any:
        return [class_name_keys(x) for x in v] if isinstance(v, list) else v

    @field_validator("guidance_scale", "ratios", "pool_size")
    @classmethod
    def _non_negative(cls, v: list[float]) -> list[float]:
        if any(x < 0 for x in v):
            raise ValueError(f"values must be >= 0; got {v}")
        return v

    @model_validator(mode="after")
    def _unique(self) -> SweepSection:
        for name in (
            "train_fractions",
            "guidance_scale",
            "guidance_rescale",
            "guidance_interval",
            "class_guidance",
            "autoguidance",
            "pool_size",
            "selectors",
            "ratios",
            "class_mix",
            "curve_fractions",
            "curve_pools",
            "curve_selectors",
        ):
            vals = [_hashable(v) for v in getattr(self, name)]
            if len(set(vals)) != len(vals):
                raise ValueError(f"sweep.{name} lists a value twice: {vals}")
        return self


def _hashable(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted(v.items()))
    return tuple(v) if isinstance(v, list) else v


class UpscalerSection(_Section):
    """An SR3-style x``factor`` diffusion upsampler trained in-run from downsampled train images.

    The low-resolution image is upsampled (bicubic) and concatenated to the noisy input; the
    network learns on random ``patch_px`` crops, and sampling runs tile by tile
    (``tile_px`` with ``overlap_px`` blended), so memory is bounded by the tile, not the image.
    """

    factor: int = Field(4, ge=2, le=8, description="upscaling factor per side")
    channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    patch_px: int = Field(64, ge=8, description="training crop side at the high resolution")
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(50, ge=0)
    ema_halflife_steps: float = Field(100.0, gt=0)
    checkpoint_every_steps: int = Field(250, ge=1)
    seed: int = 0
    sampler: Literal["ddpm", "ddim", "dpmpp"] = "dpmpp"
    steps: int = Field(10, ge=1)
    tile_px: int = Field(64, ge=8, description="sampling tile side at the high resolution")
    overlap_px: int = Field(16, ge=0, description="overlap of neighbouring tiles (blended)")
    chain: bool = Field(
        False, description="generation also writes the pool upscaled (pool name + '_x<factor>')"
    )
    chain_per_class: int | None = Field(
        None,
        ge=1,
        description="with chain: upscale only the first N images of each class (None = all); "
        "a 1024 px image costs minutes on a CPU",
    )
    compare_images: int = Field(
        32, ge=0, description="test images for the comparison with bicubic (0 = skip it)"
    )

    @model_validator(mode="after")
    def _sizes(self) -> UpscalerSection:
        f = 2 ** (len(self.channels) - 1)
        for name in ("patch_px", "tile_px"):
            if getattr(self, name) % f:
                raise ValueError(
                    f"upscaler.{name} {getattr(self, name)} must be divisible by "
                    f"{f} (2 ** (len(channels) - 1))"
                )
        if self.overlap_px * 2 > self.tile_px:
            raise ValueError(
                f"upscaler.overlap_px {self.overlap_px} must be at most half of tile_px "
                f"{self.tile_px}"
            )
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError("every upscaler.channels entry must be divisible by norm_num_groups")
        return self


class Protocol(_Section):
    name: str = Field("study", pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    output_root: str = "runs"
    dataset: DatasetSection
    model: ModelSection = Field(default_factory=ModelSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    sweep: SweepSection | None = Field(None, description="values to sweep (medsynth run expands)")
    distill: DistillSection | None = Field(None, description="`medsynth distill` settings")
    upscaler: UpscalerSection | None = Field(
        None, description="train a diffusion upsampler in-run (medsynth upscale, chain)"
    )
    edit: EditSection | None = Field(None, description="editing real images (medsynth edit)")

    @model_validator(mode="after")
    def _min_snr_needs_ddpm(self) -> Protocol:
        if self.training.loss_weighting == "min_snr" and self.schedule.kind == "rflow":
            raise ValueError(
                "training.loss_weighting 'min_snr' is defined for schedule.kind 'ddpm' "
                "(epsilon or v_prediction), not 'rflow'; use loss_weighting 'uniform'"
            )
        return self

    @model_validator(mode="after")
    def _class_guidance_names(self) -> Protocol:
        # Where the protocol names its classes, a typo fails here rather than after training.
        if self.dataset.classes and (why := self.unknown_class_names(self.dataset.classes)):
            raise ValueError(f"{why}; dataset.classes are {self.dataset.classes}")
        return self

    def unknown_class_names(self, known: list[str]) -> str | None:
        """Which key names a class outside ``known`` (the first such key), or None. Checked at
        load where ``dataset.classes`` names them, else by the run against its ingest before a
        stage that uses them clears its folder."""
        named = {
            "generation.counts": set(self.generation.counts),
            "generation.class_guidance": set(self.generation.class_guidance),
            "generation.autoguidance": set(self.generation.autoguided_classes or []),
        }
        if self.sweep is not None:
            named["sweep.class_guidance"] = {c for cg in self.sweep.class_guidance for c in cg}
        for key, names in named.items():
            if unknown := sorted(names - set(known)):
                return f"{key} names unknown classes {unknown}"
        return None

    @model_validator(mode="after")
    def _autoguidance_needs_a_guide(self) -> Protocol:
        asked = [self.generation.autoguidance] + (self.sweep.autoguidance if self.sweep else [])
        if any(asked) and not self.training.guide_steps:
            raise ValueError(
                "autoguidance needs a guide: set training.guide_fraction (e.g. 0.2, a fifth "
                "of training.max_steps) so the train stage trains one"
            )
        if self.sweep is not None and isinstance(self.generation.autoguidance, list):
            raise ValueError(
                "a sweep draws autoguided pools by sweep.autoguidance [false, true]; "
                "generation.autoguidance as a class list is for a single pool (set it to "
                "true or false here)"
            )
        return self

    @model_validator(mode="after")
    def _scale_sets_are_single_pool(self) -> Protocol:
        if self.sweep is not None and any(
            isinstance(v, list) for v in self.generation.class_guidance.values()
        ):
            raise ValueError(
                "a set of guidance scales in generation.class_guidance is for a single pool; "
                "a sweep takes one scale per class (sweep.class_guidance lists them)"
            )
        return self

    @model_validator(mode="after")
    def _latent_sizes(self) -> Protocol:
        if self.model.kind != ModelKind.monai_ldm.value:
            return self
        if self.training.init_from:
            raise ValueError(
                "model.kind 'monai_ldm' cannot adapt a base yet (training.init_from): a base "
                "and its adaptation would need the same autoencoder; train from scratch"
            )
        size, f = self.dataset.spatial_size, self.model.autoencoder.downsample
        if size % f:
            raise ValueError(
                f"model.kind 'monai_ldm': dataset.spatial_size {size} must be divisible by the "
                f"autoencoder's downsampling {f} (2 ** (len(model.autoencoder.channels) - 1))"
            )
        g = 2 ** (len(self.model.channels) - 1)
        if (size // f) % g:
            raise ValueError(
                f"model.kind 'monai_ldm': the latent side {size // f} (spatial_size {size} / {f}) "
                f"must be divisible by the UNet's downsampling {g} (2 ** (len(model.channels) - 1))"
            )
        patch = self.model.autoencoder.patch_px
        if patch is not None and patch > size:
            raise ValueError(
                f"model.autoencoder.patch_px {patch} is larger than dataset.spatial_size {size}"
            )
        return self

    def dump(self) -> dict:
        """Plain data; an absent sweep, upscaler, distill or edit section, an empty
        ``dataset.split_stratify`` and the autoencoder settings of a pixel model are left out so
        protocols without them keep their hash."""
        return _plain(self.model_dump(mode="json"))

    def identity(self) -> dict:
        """:meth:`dump` less ``runtime`` and the ``PERFORMANCE_ONLY`` knobs."""
        data = drop_later_defaults(self.dump())
        data.pop("runtime")
        for section, keys in PERFORMANCE_ONLY.items():
            for key in keys:
                data[section].pop(key)
        return data

    def sha256(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`identity` (paths as written).

        Equal for two protocols that differ only in thread count, ``dataset.workers`` or
        ``generation.batch_size``: one pool's manifest never mixes hashes over a resume.
        """
        return hashlib.sha256(canonical_json(self.identity()).encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.dump(), sort_keys=False)


def _plain(data: dict) -> dict:
    """A protocol's dump less the sections it does not use (see :meth:`Protocol.dump`)."""
    for key in ("sweep", "upscaler", "distill", "edit"):
        if data.get(key) is None:
            data.pop(key, None)
    if data["model"]["kind"] != ModelKind.monai_ldm.value:
        data["model"].pop("autoencoder", None)
    if not data["dataset"].get("split_stratify"):
        data["dataset"].pop("split_stratify", None)  # added later: keep older hashes
    return data


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# --- loading -----------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ProtocolError(f"--set expects key.path=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            if not isinstance(node.setdefault(p, {}), dict):
                raise ProtocolError(f"--set {key}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = _parse_value(value)
    return data


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the deepest YAML node along ``loc`` (pydantic error location)."""
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Protocol
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        ann = field.annotation if field else None
        # An optional section (``SweepSection | None``) names its model inside the union.
        ann = next((a for a in get_args(ann) if a is not type(None)), ann) if get_args(ann) else ann
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _override_for(loc: tuple, overrides: list[str]) -> str | None:
    """The last ``--set`` item that set ``loc`` or a section above it (it wins over the file)."""
    dotted = ".".join(str(p) for p in loc)
    hit = None
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if dotted == key or dotted.startswith(key + "."):
            hit = item
    return hit


def _format_errors(
    err: ValidationError, source: str, root: yaml.Node | None, overrides: list[str] = ()
) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        item = _override_for(loc, list(overrides))
        if item is not None:
            at = f"--set {item}"
        else:
            line = _line_of(root, loc)
            at = f"{source}:{line}" if line else source
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            lines.append(f"{at}: unknown key {where!r}.{hint} Valid keys here: {', '.join(valid)}")
        else:
            lines.append(f"{at}: {where}: {e['msg']}")
    return "invalid protocol:\n  " + "\n  ".join(lines)


def load_protocol(path: str | Path, overrides: list[str] | None = None) -> Protocol:
    """Load, override and validate a protocol; relative data paths resolve from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"protocol file not found: {path}")
    text = path.read_text()
    return parse_protocol(text, overrides, source=str(path), base_dir=path.parent)


def parse_protocol(
    text: str,
    overrides: list[str] | None = None,
    source: str = "<protocol>",
    base_dir: Path | None = None,
) -> Protocol:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ProtocolError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{source}: a protocol is a mapping of sections")
    apply_overrides(data, overrides or [])
    try:
        proto = Protocol.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(_format_errors(exc, source, root, overrides or [])) from None
    if base_dir is not None:
        ds = proto.dataset
        if ds.root and not Path(ds.root).expanduser().is_absolute():
            ds.root = str((base_dir / ds.root).resolve())
        if ds.labels_csv and not Path(ds.labels_csv).expanduser().is_absolute():
            ds.labels_csv = str((Path(ds.root) if ds.root else base_dir) / ds.labels_csv)
        _resolve_mask_path(proto, base_dir)
    return proto


def _resolve_mask_path(proto: Protocol, base_dir: Path) -> None:
    """A relative ``boxes:``/``png:`` mask path resolves from the protocol file's folder."""
    if proto.edit is None or not proto.edit.inpaint.mask:
        return
    kind, arg = MASK_PATTERN.match(proto.edit.inpaint.mask).groups()
    if kind != "rect" and not Path(arg).expanduser().is_absolute():
        proto.edit.inpaint.mask = f"{kind}:{(base_dir / arg).resolve()}"
