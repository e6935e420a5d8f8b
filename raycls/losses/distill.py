"""Knowledge distillation: soft KD (Hinton et al. 2015), hard KD (Touvron et al. 2021), and alpha schedules.

Both losses take (student_logits, teacher_logits), so a distill phase picks one by name. A phase combines them
with the label loss as `alpha * kd + (1 - alpha) * ce`, alpha from `kd_alpha` (alpha weights the teacher).
The teacher's logits are detached here: the teacher is frozen, and a gradient into it would only waste memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from raycls.errors import ConfigError
from raycls.losses import LOSSES, at_least_float32
from raycls.registry import Registry

# The losses a distill phase's `kd` may name (also in LOSSES, with every other loss).
KD_LOSSES: Registry[type[nn.Module]] = Registry("kd loss")


@KD_LOSSES.register("soft_kd")
@LOSSES.register("soft_kd")
class SoftKD(nn.Module):
    """KL(teacher || student) between the temperature-softened distributions, times T^2.

    The T^2 keeps the gradient's magnitude roughly independent of T (the softened gradients shrink as 1/T^2),
    so changing T in a search does not silently rescale alpha.
    """

    def __init__(self, *, temperature: float = 4.0):
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"{temperature=} must be > 0")
        self.temperature = float(temperature)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_p_student = F.log_softmax(at_least_float32(student_logits) / t, dim=-1)
        log_p_teacher = F.log_softmax(at_least_float32(teacher_logits.detach()) / t, dim=-1)
        # batchmean is the true KL per sample; "mean" would also divide by the number of classes.
        return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


@KD_LOSSES.register("hard_kd")
@LOSSES.register("hard_kd")
class HardKD(nn.Module):
    """Cross-entropy against the teacher's argmax: DeiT's hard distillation, no temperature to tune."""

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(at_least_float32(student_logits), teacher_logits.detach().argmax(dim=-1))


# An alpha schedule maps training progress (0 -> 1), the start value and the final value to alpha.
AlphaSchedule = Callable[[float, float, float], float]
ALPHA_SCHEDULES: Registry[AlphaSchedule] = Registry("alpha schedule")


@ALPHA_SCHEDULES.register("constant")
def constant(progress: float, start: float, end: float) -> float:
    # The final value throughout, so switching a search space between schedules keeps alpha's meaning.
    return end


@ALPHA_SCHEDULES.register("linear")
def linear(progress: float, start: float, end: float) -> float:
    return start + (end - start) * progress


@ALPHA_SCHEDULES.register("cosine")
def cosine(progress: float, start: float, end: float) -> float:
    # Flat at both ends: the teacher's weight changes slowly while the student is raw and once it has settled.
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def kd_alpha(schedule: str, progress: float, *, alpha: float, alpha_start: float = 0.0) -> float:
    """alpha at `progress` in [0, 1]: from `alpha_start` to `alpha` along `schedule` ("constant": `alpha`)."""
    rules = [
        (0 <= alpha <= 1, f"{alpha=} must be in [0, 1]"),
        (0 <= alpha_start <= 1, f"{alpha_start=} must be in [0, 1]"),
    ]
    problems = [msg for ok, msg in rules if not ok]
    if problems:
        raise ConfigError(problems)
    if not 0 <= progress <= 1:
        raise ValueError(f"{progress=} must be in [0, 1]")
    return ALPHA_SCHEDULES.get(schedule)(progress, alpha_start, alpha)
