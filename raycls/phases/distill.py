"""Knowledge distillation (Hinton et al. 2015): the student learns from the labels and from a teacher's
outputs. The teacher is a checkpoint (any earlier trial's weights) or an EMA of the student itself (a
mean teacher). The teacher runs in eval mode, without gradients, on the student's device (in bf16 there
when the step runs under autocast).

With `distill_token` the student is a DeiT (Touvron et al. 2021): a distilled ViT whose class token learns the
labels and whose distillation token learns the teacher, each through its own head; evaluated, the two heads'
logits average (timm's eval-mode output), so the student is an ordinary classifier everywhere but the loss.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from raycls import names
from raycls.config.schema import PREVIOUS, DistillConfig, SupervisedConfig, TeacherPhaseConfig
from raycls.errors import CheckpointError, ConfigError
from raycls.losses import KD_LOSSES, kd_alpha
from raycls.models import create_model, load_weights
from raycls.models.registry import InputSpec
from raycls.phases.base import PHASES, Batch, Phase, Previous, create_phase, training_hits
from raycls.phases.mixing import BatchMixer, soft_cross_entropy


class DistillModel(nn.Module):
    """Student + frozen teacher. The teacher is a submodule so that it moves with the student to the device
    and an EMA teacher is saved in (and resumed from) checkpoints; it never trains."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        # A distilled teacher (an EMA copy of a DeiT student) must give one logits tensor: the heads' average.
        if _has_distillation_token(self.teacher):
            self.teacher.set_distilled_training(False)

    def train(self, mode: bool = True) -> DistillModel:
        super().train(mode)
        self.teacher.eval()  # dropout / batch statistics off in the teacher, always
        return self

    @property
    def backbone(self) -> nn.Module:
        """The student: what a chain hands on to its next phase."""
        return self.student

    def forward(self, x: torch.Tensor, *, heads: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The student's logits; with `heads` (a distilled student in training), its class-token and
        distillation-token logits apart. Passed as an argument, not left switched on in the student, so that
        evaluation, checkpoints and the next phase of a chain see a plain classifier. Through DDP the
        argument reaches here, and both heads' gradients are synchronised."""
        if not heads:
            return self.student(x)
        self.student.set_distilled_training(True)
        try:
            return self.student(x)
        finally:
            self.student.set_distilled_training(False)

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)


@PHASES.register("distill")
class Distill(Phase[DistillConfig]):
    metric = names.VAL_ACC

    def build(self, backbone: nn.Module) -> nn.Module:
        if self.config.distill_token and not _has_distillation_token(backbone):  # before loading any teacher
            raise ConfigError(_no_token_message(backbone))
        self.kd = KD_LOSSES.create(
            self.config.kd, **({"temperature": self.config.temperature} if self.config.kd == "soft_kd" else {})
        )
        self.steps, self.total_steps = 0, 1
        self.mixer = BatchMixer.maybe(self.config, self.spec.num_classes, self.config.label_smoothing)
        trunk = teacher_trunk(self.config, self.spec, self.previous, backbone)
        return DistillModel(backbone, trunk if self.config.teacher is None else self._teacher(trunk))

    def _teacher(self, trunk: nn.Module) -> nn.Module:
        """The frozen teacher as a classifier: the phase that trained it, rebuilt on `trunk`, its heads'."""
        phase, module = teacher_module(self.config, self.spec, self.previous, trunk)
        classifier = phase.classifier(module)
        if classifier is None:
            raise ConfigError(
                f"phase.teacher={self.config.teacher}: a {phase.config.name} model has no classifier "
                "to teach with; distil from a supervised, metric or distill model"
            )
        return classifier

    def start(self, model: nn.Module, *, total_steps: int) -> None:
        self.total_steps = max(total_steps, 1)

    def after_step(self, model: nn.Module) -> None:
        self.steps += 1
        if self.config.teacher is None:
            with torch.no_grad():
                decay = self.config.ema_decay
                for ema, live in zip(model.teacher.state_dict().values(), model.student.state_dict().values()):
                    if ema.dtype.is_floating_point:
                        ema.lerp_(live, 1.0 - decay)
                    else:
                        ema.copy_(live)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        mixed = self.mixer(x, y, _unwrap(model).student) if self.mixer is not None else None
        if mixed is not None:
            x = mixed.images  # the teacher sees the same mixed images as the student
        label_logits, kd_logits = self.student_logits(model, x)
        teacher = _unwrap(model).teacher_logits(x).float()
        progress = min(self.steps / self.total_steps, 1.0)
        alpha = kd_alpha(
            self.config.alpha_schedule, progress, alpha=self.config.alpha, alpha_start=self.config.alpha_start
        )
        if mixed is not None:
            ce = soft_cross_entropy(label_logits, mixed.soft)  # timm's targets: smoothing already applied
        else:
            ce = F.cross_entropy(label_logits, y, label_smoothing=self.config.label_smoothing)
        hits = training_hits(label_logits, y) if mixed is None else {}
        return alpha * self.kd(kd_logits, teacher) + (1.0 - alpha) * ce, hits

    def student_logits(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits that learn the labels, logits that learn the teacher): the class and distillation heads of a
        DeiT student, or the one classifier's logits twice (Hinton's KD is DeiT's loss with one head)."""
        if not self.config.distill_token:
            logits = model(x).float()
            return logits, logits
        out = model(x, heads=True)
        # Some timm models have the switch but no second head (pit_ti_224, iformer_m): they return one tensor.
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ConfigError(_no_token_message(_unwrap(model).student))
        return out[0].float(), out[1].float()

    # Evaluated as a classifier (the default `outputs`): the student's logits (a DeiT's in eval mode: its
    # two heads averaged), since `backbone` of a DistillModel is the student.

    def classifier(self, model: nn.Module) -> nn.Module:
        return model.student


def teacher_module(
    config: TeacherPhaseConfig, spec: InputSpec, previous: Previous | None, trunk: nn.Module
) -> tuple[Phase, nn.Module]:
    """The teacher's phase module (what trained it, rebuilt on `trunk`) with its weights loaded."""
    teacher, where = config.teacher, f"phase.teacher={config.teacher}"
    if isinstance(teacher, str) and teacher == PREVIOUS:
        if previous is None:
            raise ConfigError("phase.teacher=previous: needs an earlier stage in `phases`")
        source, weights = previous.phase, previous.weights
    elif isinstance(teacher, str):
        source, weights = config.teacher_phase or SupervisedConfig(), load_weights(teacher)
    else:
        raise CheckpointError(
            f"phase.teacher {teacher}: a leaderboard reference must be resolved "
            "by the driver (raycls tune / raycls train) before the trial starts"
        )
    if isinstance(source, TeacherPhaseConfig):
        # A distilled model teaches with its student alone: its own teacher (and that one's) is not rebuilt.
        weights = (
            None
            if weights is None
            else {k.removeprefix("student."): v for k, v in weights.items() if k.startswith("student.")}
        )
        source = SupervisedConfig()
    phase = create_phase(source, spec)
    module = phase.build(trunk)
    if weights is not None:  # None: resuming, and this stage's checkpoint (teacher included) comes next
        try:
            module.load_state_dict(weights)
        except RuntimeError as err:  # shapes or keys differ: another architecture or phase
            raise CheckpointError(
                f"{where}: the weights do not fit a {source.name} model of the teacher's architecture "
                f"(set phase.teacher_model / teacher_phase to the teacher's sections): {str(err).splitlines()[0]}"
            ) from None
    return phase, module


def teacher_trunk(
    config: TeacherPhaseConfig, spec: InputSpec, previous: Previous | None, student: nn.Module
) -> nn.Module:
    """The teacher's architecture, before its weights: `teacher_model`; else, teaching from the previous stage
    of a chain, that stage's model; else the student's (an EMA teacher starts as a copy of the student)."""
    if config.teacher_model is not None:
        return create_model(config.teacher_model, spec)
    if config.teacher == PREVIOUS and previous is not None and previous.model is not None:
        return create_model(previous.model, spec)
    return copy.deepcopy(student)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _has_distillation_token(model: nn.Module) -> bool:
    # timm's distilled models (DeiT, PiT, LeViT, iFormer) share this switch; which class defines it varies.
    return callable(getattr(model, "set_distilled_training", None))


def _no_token_message(student: nn.Module) -> str:
    import timm

    # timm models know their name; raycls's own models only their class (the phase never sees the config).
    arch = (getattr(student, "pretrained_cfg", None) or {}).get("architecture")
    model = f"model.name={arch!r}" if arch else f"model.name (a {type(student).__name__})"
    return (
        f"phase.distill_token=true needs a student with a distillation token, and {model} has "
        f"none: set model.name to a timm distilled model (a name containing 'distilled': "
        f"{', '.join(timm.list_models('*distilled*'))}) or phase.distill_token=false"
    )
