"""Typed, frozen configs: one small model per component, and the TrialConfig that holds them.

A TrialConfig fully determines a trial together with its `seed`; it round-trips through JSON exactly, so the
leaderboard can store it and `raycls train --trial` can replay it. Field names are the field's own words and
are the same in YAML, code and leaderboard columns (`train.lr`, `model.name`, ...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from raycls.errors import RegistryError
from raycls.registry import check_name as _check_name
from raycls.registry import is_registered, known


def check_name(family: str, name: str) -> str:
    # pydantic collects ValueErrors (with their location); a RegistryError is a KeyError, so convert it.
    try:
        return _check_name(family, name)
    except RegistryError as err:
        raise ValueError(str(err)) from None


def _check_entry(family: str, name: str) -> Any:
    """The registry entry `name` of `family` (a ValueError listing the known names if unknown)."""
    from raycls.registry import FAMILIES

    check_name(family, name)
    return FAMILIES[family].get(name)


def _set_name(name: str, family: str, what: str) -> str:
    """An OOD or shift set: one of the family's own (generated images, the corruption suite) or a dataset."""
    if not is_registered(family, name) and not is_registered("dataset", name):
        raise ValueError(
            f"unknown {what} {name!r}; known: {', '.join(known(family))}, or a dataset: {', '.join(known('dataset'))}"
        )
    return name


def registered(family: str, field: str) -> Any:
    """A pydantic validator: `field` must name an entry of the `family` registry (its one source of truth)."""
    return field_validator(field)(classmethod(lambda cls, name: check_name(family, name)))


PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class Frozen(BaseModel):
    """Unknown keys are errors (a typo must never be silently ignored); instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DataConfig(Frozen):
    name: str = "digits"
    # None: $RAYCLS_DATA, else ~/.cache/raycls/data. Each dataset lives in its own subfolder of root.
    root: str | None = None
    # folder: the folder holding train/ (and optionally val/, test/); csv: the CSV file (path,label[,split]).
    path: str | None = None
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    # Keep a stratified subset of this many training images (quick runs, tests); None keeps all.
    train_subset: PositiveInt | None = None
    # Resize images on the device to this side length; None keeps the dataset's native size.
    image_size: PositiveInt | None = None
    # Image files (folder, csv) are decoded once to this side length (they may be any size on disk).
    folder_size: PositiveInt = 64
    # How an image file of any shape becomes folder_size x folder_size (raycls.images.RESIZES). crop: timm's
    # convention, the shorter side resized and the centre square kept, and training batches random-resized
    # crops of it (raycls.data.augment.training_augment): no object is ever distorted, as pretrained weights
    # expect. squash: the whole image resized to a square (aspect ratio changed; nothing cut off).
    resize: str = "crop"
    # folder / csv: decode each (file list, size) once per node into $RAYCLS_CACHE/decoded (raycls.data.decode),
    # shared by every trial and experiment; false decodes in memory every time.
    decode_cache: bool = True
    # memory: the decoded split is held in memory, then on the device (fast for small images); stream: folder /
    # csv images are read, decoded and resized by Ray Data on the cluster's CPUs and streamed to each Train
    # worker (datasets larger than memory); auto: stream when the decoded training pool would take more than
    # `memory_fraction` of this host's available memory (or of the GPU's, where one is used).
    loader: Literal["auto", "memory", "stream"] = "auto"
    memory_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.25
    download: bool = True

    _known = registered("dataset", "name")
    _known_resize = registered("resize", "resize")


class AdapterConfig(Frozen):
    """A parameter-efficient adapter (peft) on the backbone; only it and the classifier train."""

    type: str = "lora"  # an ADAPTERS name: lora, ia3
    rank: PositiveInt = 8  # LoRA's rank
    alpha: Annotated[float, Field(gt=0.0)] | None = None  # LoRA's scale numerator; None: 2 * rank
    dropout: Fraction = 0.0
    # Names of the linear layers to adapt (timm ViTs: qkv, proj, fc1, fc2); None: the adapter's default.
    targets: list[str] | None = None

    _known_adapter = registered("adapter", "type")


class ModelConfig(Frozen):
    name: str = "small_cnn"
    pretrained: bool = False
    # Width multiplier of raycls's own small CNN (channels of its first stage); timm models take `kwargs`.
    width: PositiveInt = 32
    drop_rate: Fraction = 0.0
    drop_path_rate: Fraction = 0.0
    # Small inputs (<= 64 px) get a CIFAR stem on ResNet-like models (3x3 conv, no max-pool) and a small
    # patch on ViTs; "auto" decides from the image size.
    small_input: Literal["auto", "on", "off"] = "auto"
    # Passed through to timm.create_model (e.g. {patch_size: 4}).
    kwargs: dict[str, Any] = Field(default_factory=dict)
    adapter: AdapterConfig | None = None  # LoRA / IA3 through peft: the backbone's own weights stay frozen
    # A model with a distillation token (cifar_deit_distilled) predicts from its class head, its distillation
    # head, or their mean; None: the mean (DeiT's and timm's choice).
    inference_head: Literal["class", "distill", "mean"] | None = None
    # Modules added to the backbone, by MODEL_MODULES name (raycls.models.modules), each with its options:
    # {cbam: {}, mixstyle: {p: 0.5}} on CNNs, {tome: {r: 4}} or {token_learner: {tokens: 8}} on ViTs.
    modules: dict[str, dict[str, Any] | None] = Field(default_factory=dict)

    _known = registered("model", "name")

    @field_validator("modules")
    @classmethod
    def _known_modules(cls, value: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any] | None]:
        """Each name a registered model module, its options the module's own (validated by its options model)."""
        problems, tags = [], {}
        for name, options in value.items():
            try:
                entry = _check_entry("model module", name)
            except ValueError as err:
                problems.append(f"modules.{name}: {err}")
                continue
            try:
                parsed = entry.options.model_validate(options or {})
            except ValidationError as err:
                for e in err.errors():
                    where = ".".join(str(p) for p in e["loc"])
                    problems.append(f"modules.{name}.{where}: {e['msg']}")
                continue
            if parsed.enabled and entry.exclusive is not None:
                tags.setdefault(entry.exclusive, []).append(name)
        problems += [
            f"modules: {' and '.join(n)} both change the {tag}; choose one" for tag, n in tags.items() if len(n) > 1
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    def same_architecture(self, other: ModelConfig) -> bool:
        """Whether weights of one load into the other: the fields that shape the network agree (dropout,
        drop-path, pretrained and the inference head change how it trains or predicts, not its weights)."""
        shaping = ("name", "width", "small_input", "kwargs", "adapter", "modules")
        return all(getattr(self, f) == getattr(other, f) for f in shaping)


class PhaseConfig(Frozen):
    """Common to every phase; each phase registers its own subclass in PHASE_CONFIGS."""

    name: str


class MixConfig(Frozen):
    """`phase.mix`: a batch mixer by MIXERS name (raycls.phases.mixing): mixup, cutmix, tokenmix, mixtoken
    (ViTs), manifold_mixup. Each image is mixed with the batch reversed at lam ~ Beta(alpha, alpha)."""

    name: str
    alpha: Annotated[float, Field(gt=0.0)] = 1.0
    prob: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0  # the share of batches mixed
    # tokenmix / mixtoken: the token grid's side; None: the ViT's patch grid (else 8).
    grid: PositiveInt | None = None

    _known = registered("batch mixer", "name")


def _one_mixing(config: Any) -> Any:
    """`mix` replaces mixup_alpha / cutmix_alpha (the older keys); both at once would be two mixings."""
    if config.mix is not None and (config.mixup_alpha > 0 or config.cutmix_alpha > 0):
        raise ValueError(
            f"mix: {config.mix.name} and mixup_alpha / cutmix_alpha are both set: choose one (mix: {{name: mixup}} "
            "or {name: cutmix} replaces the alphas)"
        )
    return config


class SupervisedConfig(PhaseConfig):
    name: Literal["supervised"] = "supervised"
    label_smoothing: Fraction = 0.0
    # MixUp / CutMix (timm's implementation); 0 disables each. The metric and distill phases take them too.
    mixup_alpha: Annotated[float, Field(ge=0.0)] = 0.0
    cutmix_alpha: Annotated[float, Field(ge=0.0)] = 0.0
    mix: MixConfig | None = None  # a MIXERS mixer (tokenmix, mixtoken, manifold_mixup, ...) instead of the alphas

    _one_mixing = model_validator(mode="after")(_one_mixing)


class MetricConfig(PhaseConfig):
    """A cosine classifier trained with an angular-margin loss (the ArcFace family)."""

    name: Literal["metric"] = "metric"
    # A margin loss of raycls.losses: arcface, cosface, adaface, curricularface, subcenter_arcface.
    loss: str = "arcface"
    # MixUp / CutMix (timm's mixing): the margin loss of both labels, weighted by the mixing ratio.
    mixup_alpha: Annotated[float, Field(ge=0.0)] = 0.0
    cutmix_alpha: Annotated[float, Field(ge=0.0)] = 0.0
    mix: MixConfig | None = None  # a MIXERS mixer (tokenmix, mixtoken, manifold_mixup, ...) instead of the alphas

    _one_mixing = model_validator(mode="after")(_one_mixing)
    # None: the loss's own default (its paper's).
    margin: Annotated[float, Field(ge=0.0)] | None = None
    # Logit scale s. 30 rather than the face-recognition papers' 64: 10-100 classes need less.
    scale: Annotated[float, Field(gt=0.0)] = 30.0
    # Grow the margin linearly from 0 over this many optimizer steps (a full margin can stall the start).
    margin_warmup_steps: Annotated[int, Field(ge=0)] = 0
    # Sub-centres per class (subcenter_arcface only); None: the loss's default.
    sub_centers: PositiveInt | None = None
    # Neighbours in the k-NN accuracy of the validation embeddings.
    knn_k: PositiveInt = 20

    @field_validator("loss")
    @classmethod
    def _margin_loss(cls, name: str) -> str:
        check_name("loss", name)
        if not is_registered("margin loss", name):
            raise ValueError(f"loss {name!r} is not a margin loss; margin losses: {', '.join(known('margin loss'))}")
        return name


class SupConConfig(PhaseConfig):
    """Supervised contrastive pretraining (Khosla et al. 2020): two augmented views per image."""

    name: Literal["supcon"] = "supcon"
    temperature: Annotated[float, Field(gt=0.0)] = 0.1
    # The projection MLP (backbone features -> hidden -> projection_dim, L2-normalised); the backbone's own
    # features (before the projection) are what k-NN evaluates and what later phases start from.
    hidden_dim: PositiveInt = 512
    projection_dim: PositiveInt = 128
    knn_k: PositiveInt = 20


class Reference(Frozen):
    """`{from: EXPERIMENT, pick: best}`: a checkpoint of another experiment's trial, named by the leaderboard.
    The driver resolves it to a path before trials start (phases never read leaderboards)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)
    experiment: str = Field(alias="from")
    # "best": the completed trial with the best score; or a trial id.
    pick: str = "best"


# `teacher: previous`: the chain's previous stage is the teacher.
PREVIOUS = "previous"


class TeacherPhaseConfig(PhaseConfig):
    """A phase that learns from a teacher model (distill, token_distill): where the teacher comes from."""

    # A teacher checkpoint: a folder holding model.pt, or the file; `previous` (in a chain): the previous
    # stage's best model, heads included (an ArcFace stage teaches through its cosine classifier). A leaderboard reference
    # ({from: EXPERIMENT, pick: best}) is resolved to such a path by the driver before trials start.
    teacher: str | Reference | None = None
    # Filled by the driver when `teacher` was a Reference: "EXPERIMENT/TRIAL_ID", kept for the leaderboard.
    teacher_trial: str | None = None
    # The teacher's architecture; None: the student's (model section), or the referenced trial's.
    teacher_model: ModelConfig | None = None
    # The phase that trained the teacher checkpoint (its heads give the logits: a metric phase's cosine
    # classifier, a supervised model's linear head); None: a plain classifier. Filled from the referenced
    # trial by the driver.
    teacher_phase: SerializeAsAny[PhaseConfig] | None = None

    _dispatch = field_validator("teacher_phase", mode="before")(classmethod(lambda cls, value: _dispatch_phase(value)))


class DistillConfig(TeacherPhaseConfig):
    """Knowledge distillation into the student (the trial's model) from a teacher checkpoint, or from an
    exponential moving average of the student itself when `teacher` is null."""

    name: Literal["distill"] = "distill"
    kd: str = "soft_kd"  # a KD_LOSSES name
    temperature: Annotated[float, Field(gt=0.0)] = 4.0
    # Weight of the distillation term: loss = alpha * kd + (1 - alpha) * cross-entropy on the labels.
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.6
    # How alpha moves from alpha_start to alpha over training: constant (alpha throughout), linear, cosine.
    alpha_schedule: str = "constant"  # an ALPHA_SCHEDULES name
    alpha_start: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    # EMA teacher only: decay per optimizer step.
    ema_decay: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.999
    label_smoothing: Fraction = 0.0
    # MixUp / CutMix (timm's): the student and the teacher see the same mixed images; the label term
    # learns the mixed (smoothed) targets.
    mixup_alpha: Annotated[float, Field(ge=0.0)] = 0.0
    cutmix_alpha: Annotated[float, Field(ge=0.0)] = 0.0
    mix: MixConfig | None = None  # a MIXERS mixer (tokenmix, mixtoken, manifold_mixup, ...) instead of the alphas

    _one_mixing = model_validator(mode="after")(_one_mixing)
    # DeiT (Touvron et al. 2021): a distilled ViT student (timm's *_distilled_* models) learns the labels
    # through its class token and the teacher through its distillation token; at inference both heads average.
    distill_token: bool = False

    _known_kd = registered("kd loss", "kd")

    _known_alpha_schedule = registered("alpha schedule", "alpha_schedule")

    @field_validator("mix")
    @classmethod
    def _teacher_sees_the_mix(cls, mix: MixConfig | None) -> MixConfig | None:
        if mix is not None and _check_entry("batch mixer", mix.name).hidden:
            raise ValueError(
                f"mix: {mix.name} mixes the student's hidden features, which the teacher never sees; "
                "distil with an image mixer (mixup, cutmix, tokenmix)"
            )
        return mix


class TokenDistillConfig(TeacherPhaseConfig):
    """CST-style token distillation from a ViT teacher into a ViT student (raycls.losses.tokens): the student's
    patch tokens at `student_layers`, projected to the teacher's width, learn the teacher's tokens at
    `teacher_layers` (L_tok), and their token-token similarities learn the teacher's (L_rel), beside
    cross-entropy on the labels: loss = CE + tok_weight * L_tok + rel_weight * L_rel, with L_rel from epoch
    `rel_start_epoch` of the stage on (L_tok alone before). The teacher: `previous` (a ViT stage of the chain),
    a checkpoint or leaderboard reference, or `teacher_model` with pretrained weights (DINOv2 ViT-S/14:
    vit_small_patch14_dinov2.lvd142m, with teacher_image_size 224)."""

    name: Literal["token_distill"] = "token_distill"
    # Block indices (negative: from the last) whose output tokens are matched, pair by pair; None: the middle
    # block and the last of each model.
    student_layers: list[int] | None = None
    teacher_layers: list[int] | None = None
    tok_weight: Annotated[float, Field(ge=0.0)] = 1.0
    rel_weight: Annotated[float, Field(ge=0.0)] = 0.1
    rel_start_epoch: Annotated[int, Field(ge=0)] = 0
    # Softmax temperature of the token-token similarity rows in L_rel.
    rel_temperature: Annotated[float, Field(gt=0.0)] = 0.1
    # The teacher sees the images resized to this side (a pretrained ViT's own resolution); None: as given.
    teacher_image_size: PositiveInt | None = None
    label_smoothing: Fraction = 0.0

    @model_validator(mode="after")
    def _has_teacher(self) -> TokenDistillConfig:
        if self.teacher is None and (self.teacher_model is None or not self.teacher_model.pretrained):
            raise ValueError(
                "token_distill needs a teacher: `teacher: previous` (in a chain), a checkpoint, "
                "{from: EXPERIMENT}, or teacher_model with pretrained: true "
                "(e.g. {name: vit_small_patch14_dinov2.lvd142m, pretrained: true})"
            )
        if (self.student_layers is None) != (self.teacher_layers is None) or (
            self.student_layers is not None and len(self.student_layers) != len(self.teacher_layers or [])
        ):
            raise ValueError(
                f"student_layers {self.student_layers} and teacher_layers {self.teacher_layers}: "
                "give both, of the same length (they pair one to one), or neither"
            )
        return self


# Phase configs live here (not in phases/) so that a config validates without importing the training code;
# phases/ registers one implementation per name and a contract test checks the two registries agree.
# Keyed by each class's own `name` literal (the one place a phase's name is written on the config side).
PHASE_CONFIGS: dict[str, type[PhaseConfig]] = {
    cls.model_fields["name"].default: cls
    for cls in (SupervisedConfig, MetricConfig, SupConConfig, DistillConfig, TokenDistillConfig)
}


# A fast dev run's largest batch: big enough for batch norm and SupCon's positives, small enough that a
# ResNet-18 step on CIFAR takes about a second on a 2-core CPU (512 two-view images took 29 s).
FAST_DEV_BATCH_SIZE = 32
# A fast dev run's batches per split and epoch (Lightning's `fast_dev_run` runs one; two exercise the
# step-to-step state, e.g. the optimizer's second update and a scheduler step).
FAST_DEV_BATCHES = 2
# Images of each set a fast dev run evaluates (test, validation, OOD, shifted): one batch. The full suite
# makes about 20 passes over a set (TTA's views, on the shifted sets too): zoo's ResNet-18 took 80 s at 64.
FAST_DEV_EVAL_IMAGES = FAST_DEV_BATCH_SIZE


class EarlyStoppingConfig(Frozen):
    """Stop a stage once its phase's metric has not improved by more than `min_delta` for `patience` epochs.
    The trial ends `completed` (it was not cut by the scheduler) with `stopped_by: patience`."""

    patience: PositiveInt = 5
    min_delta: Annotated[float, Field(ge=0.0)] = 0.0


class SamConfig(Frozen):
    """Sharpness-aware minimisation (Foret et al. 2021) around any optimizer: each step first climbs to the
    worst point within `rho`, then descends with the gradient taken there (two forward/backward passes).
    `adaptive`: ASAM (Kwon et al. 2021), the radius scaled per weight by its magnitude."""

    rho: Annotated[float, Field(gt=0.0)] = 0.05
    adaptive: bool = False


class LookaheadConfig(Frozen):
    """Lookahead (Zhang et al. 2019, timm's): slow weights move `alpha` of the way to the fast ones every `k` steps."""

    k: Annotated[int, Field(ge=1)] = 5
    alpha: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5


class LrMultConfig(Frozen):
    """Per-parameter-group learning rates: the backbone's lr is `lr * backbone` (heads keep `lr`)."""

    backbone: Annotated[float, Field(ge=0.0)] = 1.0


class EmaConfig(Frozen):
    """An exponential moving average of the weights (timm's ModelEmaV3), updated after every step and
    evaluated beside the raw weights every epoch (`val_*_ema`). `select: true`: the average is what each
    epoch is judged by (its `val_*` metrics, the best epoch, the checkpoint); the raw weights report `val_*_raw`."""

    decay: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.9998
    warmup: bool = False  # timm's decay warm-up (the decay grows with the step count)
    select: bool = False


class SwaConfig(Frozen):
    """Stochastic weight averaging (Izmailov et al. 2018, torch.optim.swa_utils): the weights at the end of
    each epoch after the first `start` of the stage's epochs are averaged, BatchNorm statistics recomputed
    for the average on the training split, and the average evaluated beside the raw weights (`val_*_swa`).
    `select: true`: once averaging has begun, the average is what each epoch is judged and checkpointed by."""

    start: Fraction = 0.75
    select: bool = True


class LrScheduleConfig(Frozen):
    """Options of the lr schedules that are torch.optim.lr_scheduler classes (`train.scheduler`); periods are
    in epochs. step: lr * gamma every `step_epochs`; multistep: lr * gamma at each of `milestones` (None: at
    half and three quarters of the stage); cosine_restarts: cosine to lr * min_lr_ratio over `restart_epochs`,
    each period `restart_mult` times the previous; onecycle: from lr / div_factor up to lr over `pct_start`
    of the stage (or warmup_epochs), then down to lr / (div_factor * final_div_factor); plateau: lr * factor
    once the phase's metric has not improved by more than `threshold` for `patience` epochs."""

    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    step_epochs: PositiveInt = 30
    milestones: list[PositiveInt] | None = None
    restart_epochs: PositiveInt = 10
    restart_mult: PositiveInt = 1
    pct_start: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.3
    div_factor: Annotated[float, Field(ge=1.0)] = 25.0
    final_div_factor: Annotated[float, Field(ge=1.0)] = 1.0e4
    factor: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    patience: Annotated[int, Field(ge=0)] = 2
    threshold: Annotated[float, Field(ge=0.0)] = 0.0
    # The validation metric plateau watches; None: the phase's own (the one its epochs are judged by).
    metric: str | None = None

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"milestones must increase, got {value}")
        return value

    def milestones_for(self, epochs: int) -> list[int]:
        return (
            self.milestones if self.milestones is not None else sorted({max(1, epochs // 2), max(1, 3 * epochs // 4)})
        )


class UnfreezeConfig(Frozen):
    """Progressive unfreezing (`train.freeze: progressive`, ULMFiT's gradual unfreezing): epoch 0 trains the
    heads only; every `every` epochs the next `blocks` backbone blocks, counted from the top (nearest the
    head) down to the stem, start training too. Blocks are timm's layer groups (`group_matcher`: the stem,
    each residual / transformer block), or the backbone's children for models without one."""

    every: PositiveInt = 1
    blocks: PositiveInt = 1
    # timm's coarse groups: whole stages (resnet's layer1..4) instead of single blocks.
    coarse: bool = False


class TrainConfig(Frozen):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 512
    optimizer: str = "sgd"
    lr: Annotated[float, Field(gt=0.0)] = 0.1
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    nesterov: bool = True
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    scheduler: str = "cosine"  # the lr schedule (an LR_SCHEDULES name; the YAML key predates the rename)
    # Options of the step, multistep, cosine_restarts, onecycle and plateau schedules.
    lr_schedule: LrScheduleConfig = Field(default_factory=LrScheduleConfig)
    # Linear warm-up, in epochs (fractions allowed), before the schedule proper.
    warmup_epochs: Annotated[float, Field(ge=0.0)] = 0.0
    # The cosine and linear schedules end at lr * min_lr_ratio (cosine_restarts' and plateau's floor too).
    min_lr_ratio: Fraction = 0.0
    # Clip the global gradient norm to this value; None disables clipping.
    grad_clip: Annotated[float, Field(gt=0.0)] | None = None
    # bf16 autocast: "auto" turns it on for CUDA only (CPU bf16 matmuls are slower than fp32 on most CPUs);
    # fp16: autocast with a gradient scaler (GPUs without bf16).
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    # channels_last memory format: "auto" turns it on for CUDA only.
    channels_last: Literal["auto", "on", "off"] = "auto"
    early_stopping: EarlyStoppingConfig | None = None  # None: every epoch runs (or the trial scheduler stops it)
    sam: SamConfig | None = None  # SAM / ASAM around the optimizer
    lookahead: LookaheadConfig | None = None
    # Gradient centralisation (Yong et al. 2020): each weight's gradient minus its mean over all but dim 0.
    grad_centralization: bool = False
    lr_mult: LrMultConfig = Field(default_factory=LrMultConfig)
    ema: EmaConfig | None = None  # an average of the weights, evaluated beside them (and selectable)
    swa: SwaConfig | None = None  # an average of the last epochs' weights (not with ema)
    # torch.compile the training model; the first step's seconds (compilation) are reported as compile_s,
    # apart from epoch_s. The backend: inductor (the default, generates kernels), aot_eager, eager (checks).
    compile: bool = False
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    # Train only part of the model: "backbone" freezes the backbone but its classifier (heads train), a list
    # names modules of the phase's model; frozen BatchNorm statistics stay as they are. "progressive": the
    # backbone starts frozen and is unfrozen block by block from the top (`unfreeze`), heads training throughout.
    freeze: Literal["none", "backbone", "progressive"] | list[str] = "none"
    unfreeze: UnfreezeConfig = Field(default_factory=UnfreezeConfig)

    _known_optimizer = registered("optimizer", "optimizer")

    _known_lr_schedule = registered("lr schedule", "scheduler")

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be < epochs={self.epochs}")
        return self

    @model_validator(mode="after")
    def _one_average(self) -> TrainConfig:
        if self.ema is not None and self.swa is not None:
            raise ValueError("ema and swa are both set: choose one weight average per stage")
        return self

    @model_validator(mode="after")
    def _sam_without_fp16(self) -> TrainConfig:
        # SAM's climb needs the true gradient norm: with fp16's scaled (and maybe inf) gradients it would
        # climb by the loss scale. bf16 needs no scaler.
        if self.sam is not None and self.amp == "fp16":
            raise ValueError("sam with amp: fp16 is not supported; use amp: bf16 (no gradient scaler) or off")
        return self


class AffineConfig(Frozen):
    """MNIST-style affine jitter, drawn per image: rotation in [-degrees, degrees], a shift of up to
    `translate` of the side in each direction, a zoom in [scale_min, scale_max]; uncovered pixels are black."""

    degrees: Annotated[float, Field(ge=0.0, le=180.0)] = 0.0
    translate: Fraction = 0.0
    scale_min: Annotated[float, Field(gt=0.0)] = 1.0
    scale_max: Annotated[float, Field(gt=0.0)] = 1.0

    @model_validator(mode="after")
    def _scale_range(self) -> AffineConfig:
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min {self.scale_min} > scale_max {self.scale_max}")
        return self


class RandAugmentConfig(Frozen):
    """RandAugment (Cubuk et al. 2020, torchvision's ops): `num_ops` ops per image, each drawn per image,
    at `magnitude` of 31 bins (0: none, 30: the strongest), with a random sign per image."""

    num_ops: Annotated[int, Field(ge=1, le=6)] = 2
    magnitude: Annotated[int, Field(ge=0, le=30)] = 9


class ErasingConfig(Frozen):
    """Random erasing (Zhong et al. 2020, timm's recipes): with probability `p` each image loses one
    rectangle of `area_min`..`area_max` of its area (aspect 0.3..3.3), filled with the mean colour."""

    p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25
    area_min: Annotated[float, Field(gt=0.0, le=1.0)] = 0.02
    area_max: Annotated[float, Field(gt=0.0, le=1.0)] = 1 / 3

    @model_validator(mode="after")
    def _area_range(self) -> ErasingConfig:
        if self.area_min > self.area_max:
            raise ValueError(f"area_min {self.area_min} > area_max {self.area_max}")
        return self


class AugmentConfig(Frozen):
    """Train-time augmentations, run on the device on whole batches. Each field names a registered op."""

    # Applied in field order. Random-resized crop (SimCLR/SupCon's main augmentation): a crop covering this
    # minimum fraction of the area (up to all of it, aspect 3/4..4/3), resized back; 0 disables.
    resized_crop: Fraction = 0.0
    hflip: bool = False
    # Random crop back to the input size after reflect-padding by this many pixels; 0 disables.
    random_crop: Annotated[int, Field(ge=0)] = 0
    affine: AffineConfig | None = None
    # Colour jitter of this strength (brightness, contrast and saturation each by up to +-strength, SimCLR
    # style, applied with probability 0.8); 0 disables.
    color_jitter: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    # Probability of turning an image grey (SimCLR uses 0.2).
    grayscale: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    # Policies (torchvision's op tables, each op drawn per image): raycls.data.policies.
    randaugment: RandAugmentConfig | None = None
    trivialaugment: bool = False  # TrivialAugmentWide: one op per image at a magnitude drawn per image
    autoaugment: Literal["cifar10", "imagenet", "svhn"] | None = None  # AutoAugment's learned policies
    # Cutout: zero one square of this side per image; 0 disables.
    cutout: Annotated[int, Field(ge=0)] = 0
    random_erasing: ErasingConfig | None = None


class TtaConfig(Frozen):
    """Test-time augmentation: `test_acc_tta`, the shifted sets' `*_tta` accuracies, `raycls predict --tta`."""

    # Fixed views averaged (raycls.evaluate.tta: identity, hflip, translate), composed in this order, each
    # keeping half the weight on the unaltered image as airbench weighs its 6 views. None: the trial's training
    # augmentation decides (hflip only if it flipped, translate if it cropped or shifted): a view the model
    # never trained on only hurts it (a mirrored digit is another symbol: digits' TTA accuracy fell 0.992 -> 0.953).
    views: tuple[str, ...] | None = None
    # Random passes through the trial's own training augmentation (seeded), averaged with the views: their
    # weighted average counts as one pass, each run as one more. 0: none.
    runs: Annotated[int, Field(ge=0)] = 0

    @field_validator("views")
    @classmethod
    def _view_names(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else tuple(check_name("tta view", name) for name in value)


class EvalConfig(Frozen):
    """The held-out evaluation of every trial's best weights (raycls.evaluate.suite) and what it covers."""

    # Top-k accuracies of the evaluation (`test_top3`, ...); the largest is also validated every epoch
    # (`val_top5`). A single k means (1, k). Capped at the number of classes.
    topk: tuple[PositiveInt, ...] = (1, 3, 5)
    # Which trials are evaluated during a search: `completed` (at the end of the trial, on its workers),
    # `all` (early-stopped ones too, by the driver after the search), `none`.
    on: Literal["completed", "all", "none"] = "completed"
    suite: str = "default"  # a registered eval suite: default (cheap) or full
    # Whether a trial's own evaluation draws the default suite's pictures (confusion matrix, reliability,
    # confidence histogram: about 0.6 s of the trial's CPU). Off, it writes their tables only and the
    # pictures are drawn by whoever shows them: `raycls eval`, the report, W&B (raycls.evaluate.figures).
    trial_plots: bool = False
    # OOD sets of the full suite: generated (uniform_noise, gaussian_blobs, textures) or any dataset name,
    # resized to the training images' size (its channels must match).
    ood: tuple[str, ...] = ("uniform_noise", "gaussian_blobs", "textures")
    # Shifted sets of the full suite: `corruptions` (generated, CIFAR-10-C protocol) or a dataset name with
    # the same classes (cifar10_1 for cifar10).
    shift: tuple[str, ...] = ("corruptions",)
    corruptions: tuple[str, ...] = (
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "gaussian_blur",
        "brightness",
        "contrast",
        "pixelate",
        "jpeg_compression",
    )
    severities: tuple[Annotated[int, Field(ge=1, le=5)], ...] = (1, 2, 3, 4, 5)
    shift_images: PositiveInt = 1000  # test images corrupted per corruption and severity
    gallery: PositiveInt = 24  # most confident mistakes drawn
    cam_per_class: PositiveInt = 2  # GradCAM++ overlays per class
    # Images of each evaluated set (test, validation, training, OOD, shifted): a stratified seeded sample of
    # this many (raycls.data.splits.stratified_sample); None: all of them. Fast dev runs: FAST_DEV_EVAL_IMAGES.
    images: PositiveInt | None = None
    tta: TtaConfig = Field(default_factory=TtaConfig)

    _suite = registered("eval suite", "suite")

    @field_validator("topk", mode="before")
    @classmethod
    def _one_k(cls, value: Any) -> Any:
        return (1, value) if isinstance(value, int) else value

    @field_validator("ood")
    @classmethod
    def _ood_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_set_name(name, "ood set", "OOD set") for name in value)

    @field_validator("shift")
    @classmethod
    def _shift_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_set_name(name, "shift set", "shift set") for name in value)

    @field_validator("corruptions")
    @classmethod
    def _corruption_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_name("corruption", name) for name in value)

    @property
    def val_topk(self) -> int:
        """The k of the per-epoch validation top-k accuracy."""
        return max(self.topk)

    def fast_dev_run(self) -> EvalConfig:
        """Every step of the suite, on a handful of images: one OOD set, one corruption at one severity, few
        overlays, at most one TTA run. It checks that the evaluation runs, in seconds, not what it measures."""
        images = min(self.images or FAST_DEV_EVAL_IMAGES, FAST_DEV_EVAL_IMAGES)
        return self.model_copy(
            update={
                "images": images,
                "shift_images": min(self.shift_images, images),
                "ood": self.ood[:1],
                "corruptions": self.corruptions[:1],
                "severities": self.severities[:1],
                "gallery": min(self.gallery, 8),
                "cam_per_class": 1,
                "tta": self.tta.model_copy(update={"runs": min(self.tta.runs, 1)}),
            }
        )


def _dispatch_phase(value: Any) -> Any:
    # Each phase has its own config class; pick it by `name` so its own fields are validated.
    if isinstance(value, dict):
        name = value.get("name", "supervised")
        if name not in PHASE_CONFIGS:
            raise ValueError(f"unknown phase {name!r}; known: {', '.join(sorted(PHASE_CONFIGS))}")
        return PHASE_CONFIGS[name].model_validate({**value, "name": name})
    return value


class StageConfig(Frozen):
    """One phase of a chain (`phases:`) as written: its `train` and `augment` hold only what differs from the
    trial's top-level sections (so `--set train.batch_size=64` still reaches every stage)."""

    # The stage's leaderboard prefix (`supcon.val_knn_acc`) and its part of the chain's name
    # (`supcon>arcface>distill`); None: the phase's name.
    name: str | None = None
    phase: SerializeAsAny[PhaseConfig]
    # The stage's own model (a CNN teacher stage, then a ViT student distilled from it); None: the trial's
    # `model`. A stage whose model differs from the previous stage's starts from fresh weights, so it must
    # learn from that stage another way: distillation with `teacher: previous`.
    model: ModelConfig | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    augment: dict[str, Any] = Field(default_factory=dict)

    _dispatch = field_validator("phase", mode="before")(classmethod(lambda cls, value: _dispatch_phase(value)))


class Stage(Frozen):
    """A stage with its sections merged: what the loop runs."""

    label: str
    phase: SerializeAsAny[PhaseConfig]
    model: ModelConfig
    train: TrainConfig
    augment: AugmentConfig


class TrialConfig(Frozen):
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    phase: SerializeAsAny[PhaseConfig] = Field(default_factory=SupervisedConfig)
    # A chain: these phases in order, each starting from the previous one's best weights (replaces `phase`).
    phases: list[StageConfig] | None = None
    # Start the backbone from these weights: a checkpoint path, or {from: EXPERIMENT, pick: best} (resolved to
    # a path by the driver). Only the backbone is taken: heads belong to the phase that trained them.
    init: str | Reference | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    _dispatch = field_validator("phase", mode="before")(classmethod(lambda cls, value: _dispatch_phase(value)))

    @model_validator(mode="before")
    @classmethod
    def _phase_or_phases(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("phases") is not None and "phase" in raw:
            raise ValueError("give either `phase` (one phase) or `phases` (a chain), not both")
        return raw

    @model_validator(mode="after")
    def _stages_valid(self) -> TrialConfig:
        if self.phases is not None and not self.phases:
            raise ValueError(
                "phases: expected a non-empty list of stages, e.g. [{phase: {name: supcon}, train: {epochs: 20}}]"
            )
        for i, stage in enumerate(self.phases or []):
            for section, model in (("train", TrainConfig), ("augment", AugmentConfig)):
                try:
                    model.model_validate({**getattr(self, section).model_dump(), **getattr(stage, section)})
                except ValidationError as err:
                    first = err.errors()[0]
                    where = ".".join(str(part) for part in first["loc"])
                    raise ValueError(f"phases.{i}.{section}{'.' + where if where else ''}: {first['msg']}") from None
        for i, stage in enumerate(self.stages):
            if getattr(stage.phase, "teacher", None) == PREVIOUS and i == 0:
                raise ValueError(
                    f"{'phases.0.' if self.phases else ''}phase.teacher: `previous` needs an earlier stage in `phases`"
                )
        labels = [s.label for s in self.stages]
        if len(set(labels)) != len(labels):
            raise ValueError(f"phases: stage names must differ (got {' > '.join(labels)}); give each stage a `name`")
        for i, (before, stage) in enumerate(zip(self.stages, self.stages[1:]), start=1):
            if not stage.model.same_architecture(before.model) and getattr(stage.phase, "teacher", None) != PREVIOUS:
                raise ValueError(
                    f"phases.{i} ({stage.label}): its model ({stage.model.name}) differs from stage {before.label}'s "
                    f"({before.model.name}), so it cannot start from that stage's weights; make it a distillation "
                    f"stage with `teacher: previous` (phase.name: distill or token_distill), or give both the same model"
                )
        return self

    @property
    def final_model(self) -> ModelConfig:
        """The model the trial ends with (its last stage's): what is evaluated, exported and served."""
        return self.stages[-1].model

    @model_serializer(mode="wrap")
    def _drop_unused_phase(self, handler: Any) -> dict[str, Any]:
        # A chain's phases live in `phases`; dumping the unused default `phase` too would not load back.
        data = handler(self)
        if self.phases is not None:
            data.pop("phase", None)
        return data

    @property
    def stages(self) -> list[Stage]:
        """The phases this trial runs, in order: the chain, or the single `phase` as a one-stage chain."""
        if self.phases is None:
            return [
                Stage(label=self.phase.name, phase=self.phase, model=self.model, train=self.train, augment=self.augment)
            ]
        return [
            Stage(
                label=stage.name or stage.phase.name,
                phase=stage.phase,
                model=stage.model or self.model,
                train=TrainConfig.model_validate({**self.train.model_dump(), **stage.train}),
                augment=AugmentConfig.model_validate({**self.augment.model_dump(), **stage.augment}),
            )
            for stage in self.phases
        ]

    @property
    def chain(self) -> str:
        """The leaderboard's `phase` column: `supervised`, or `supcon>arcface>distill` for a chain."""
        return ">".join(s.label for s in self.stages)

    @property
    def total_epochs(self) -> int:
        """Epochs over the whole chain: the time axis ASHA's rungs count in."""
        return sum(s.train.epochs for s in self.stages)

    def fast_dev_run(self) -> TrialConfig:
        """This config as a smoke test (Lightning's `fast_dev_run`): one epoch per stage, no warm-up, batches
        of at most FAST_DEV_BATCH_SIZE images; the loop also runs only FAST_DEV_BATCHES batches of each split
        (`RunContext.limit_batches`), and the evaluation a few images per set (`EvalConfig.fast_dev_run`). It
        checks that every part runs, in seconds, not what it learns."""
        data = {**self.to_dict(), "eval": self.eval.fast_dev_run().model_dump(mode="json")}

        def shrink(train: dict[str, Any], *, fill: bool) -> None:
            small = {
                "epochs": 1,
                "warmup_epochs": 0.0,
                **{
                    k: min(int(v), FAST_DEV_BATCH_SIZE)
                    for k, v in train.items()
                    if k in ("batch_size", "eval_batch_size")
                },
            }
            train.update(small if fill else {k: v for k, v in small.items() if k in train})

        shrink(data["train"], fill=True)
        for stage in data.get("phases") or []:
            shrink(stage["train"], fill=False)  # a stage lists only its overrides of the top-level `train`
        return TrialConfig.model_validate(data)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> TrialConfig:
        return cls.model_validate_json(text)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
