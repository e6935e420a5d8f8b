"""Knowledge distillation (Hinton et al. 2015): the student learns from the labels and from a teacher's
outputs. The teacher is a checkpoint (any earlier trial's weights) or an EMA of the student itself (a
mean teacher). The teacher runs in eval mode, without gradients, on the student's device (in bf16 there
when the step runs under autocast).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from raycls.config.schema import DistillConfig
from raycls.errors import CheckpointError
from raycls.evaluate import names
from raycls.losses import LOSSES, kd_alpha
from raycls.models import create_model, load_weights
from raycls.phases.base import PHASES, Batch, Phase
from raycls.phases.supervised import Supervised


class DistillModel(nn.Module):
    """Student + frozen teacher. The teacher is a submodule so that it moves with the student to the device
    and an EMA teacher is saved in (and resumed from) checkpoints; it never trains."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "DistillModel":
        super().train(mode)
        self.teacher.eval()  # dropout / batch statistics off in the teacher, always
        return self

    @property
    def backbone(self) -> nn.Module:
        """The student: what a chain hands on to its next phase."""
        return self.student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)


@PHASES.register("distill")
class Distill(Phase[DistillConfig]):
    metric = names.VAL_ACC

    def build(self, backbone: nn.Module) -> nn.Module:
        self.kd = LOSSES.get(self.config.kd)(**({"temperature": self.config.temperature} if self.config.kd == "soft_kd" else {}))
        self.steps, self.total_steps = 0, 1
        # The teacher has the student's architecture unless teacher_model says otherwise; an EMA teacher
        # starts as a copy of the student.
        teacher = create_model(self.config.teacher_model, self.spec) if self.config.teacher_model else copy.deepcopy(backbone)
        if self.config.teacher is not None:
            if not isinstance(self.config.teacher, str):
                raise CheckpointError(f"phase.teacher {self.config.teacher}: a leaderboard reference must be resolved "
                                      "by the driver (raycls tune / raycls train) before the trial starts")  # fmt: skip
            try:
                teacher.load_state_dict(load_weights(self.config.teacher))
            except RuntimeError as err:  # shapes or keys differ: another architecture, or a non-classifier
                raise CheckpointError(
                    f"phase.teacher={self.config.teacher}: the weights do not fit the teacher model "
                    f"(set phase.teacher_model to the teacher's model section): {str(err).splitlines()[0]}"
                ) from None
        return DistillModel(backbone, teacher)

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
        logits = model(x).float()
        teacher = _unwrap(model).teacher_logits(x).float()
        progress = min(self.steps / self.total_steps, 1.0)
        alpha = kd_alpha(self.config.alpha_schedule, progress, alpha=self.config.alpha, alpha_start=self.config.alpha_start)
        ce = F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)
        return alpha * self.kd(logits, teacher) + (1.0 - alpha) * ce, {}

    # Evaluated as a classifier: the student's logits.
    eval_batch = Supervised.eval_batch
    eval_metrics = Supervised.eval_metrics


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)

