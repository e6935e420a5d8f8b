"""Cosine-classifier margin losses: ArcFace, CosFace, AdaFace, CurricularFace and Sub-center ArcFace.

Each loss owns its cosine head (the class weights), so a phase builds one module and gets both the training loss
and the plain cosine logits it computes val accuracy from (`MarginOutput.cosine`, or `loss.cosine(embeddings)`).

Written from the papers and their official code rather than wrapped from pytorch-metric-learning: its
ArcFaceLoss computes cos(theta + m) with no fallback when theta + m > pi, takes the margin in degrees and stores
W as [dim, classes]; matching the formulas here would have cost an adapter per loss plus a dependency.

State that must survive a resume lives in buffers (so in `state_dict()` and every checkpoint): the warm-up step
of every loss, AdaFace's running feature-norm mean/std, CurricularFace's `t`. Buffers only change in training
mode, so validation never moves them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from raycls.errors import ConfigError
from raycls.losses import LOSSES, at_least_float32

# Floor for 1 - cos^2 under the square root: d/dc sqrt(1 - c^2) is infinite at |c| = 1, which a trained model
# reaches for its easiest samples. The floor caps the gradient at ~1/sqrt(1e-7) and moves the value by < 3e-4.
_SIN2_FLOOR = 1e-7
# AdaFace's official epsilon: keeps acos away from +-1 (infinite gradient) and the std away from 0.
_ADAFACE_EPS = 1e-3


class MarginOutput(NamedTuple):
    loss: torch.Tensor  # 0-d: mean cross-entropy over the batch, of the scaled logits with the margin
    cosine: torch.Tensor  # [B, C]: cosine logits, no margin, no scale; argmax is the prediction


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def _head_problems(dim: int, num_classes: int, sub_centers: int) -> list[str]:
    rules = [
        (dim >= 1, f"{dim=} must be >= 1"),
        (num_classes >= 2, f"{num_classes=} must be >= 2"),
        (sub_centers >= 1, f"{sub_centers=} must be >= 1"),
    ]
    return [message for ok, message in rules if not ok]


class CosineHead(nn.Module):
    """Cosine similarity between L2-normalised embeddings and L2-normalised class weights.

    With `sub_centers=K` each class has K weight rows (class-major: row c*K + k) and a class's cosine is the
    max over its sub-centres (Deng et al. 2020), so noisy samples can gather at a sub-centre of their own.
    """

    def __init__(self, dim: int, num_classes: int, *, sub_centers: int = 1):
        super().__init__()
        _raise_if(_head_problems(dim, num_classes, sub_centers))
        self.num_classes = num_classes
        self.sub_centers = sub_centers
        self.weight = nn.Parameter(torch.empty(num_classes * sub_centers, dim))
        # Any isotropic init works: rows are normalised in forward, only their directions matter.
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        # In float32 even under AMP: at scale 64 a bf16 cosine (~3 digits) would put +-0.25 of noise on a logit.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            dtype = torch.promote_types(torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32)
            cosine = F.linear(F.normalize(embeddings.to(dtype), dim=-1), F.normalize(self.weight.to(dtype), dim=-1))
        if self.sub_centers > 1:
            cosine = cosine.view(-1, self.num_classes, self.sub_centers).amax(dim=-1)
        return cosine


def _target(cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """cos(theta_y) of every sample: [B]."""
    return cosine.gather(1, labels[:, None]).squeeze(1)


def _with_target(cosine: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`cosine` with each row's target logit replaced (out of place, so autograd sees both paths)."""
    return cosine.scatter(1, labels[:, None], target[:, None].to(cosine.dtype))


def cos_plus_margin(target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """cos(theta + m) from cos(theta), as cos*cos(m) - sin*sin(m): no acos, whose gradient blows up at +-1."""
    sin = torch.sqrt((1.0 - target * target).clamp_min(_SIN2_FLOOR))
    return target * torch.cos(margin) - sin * torch.sin(margin)


def arcface_target(target: torch.Tensor, margin: torch.Tensor, *, easy_margin: bool = False) -> torch.Tensor:
    """ArcFace's target logit cos(theta + m), with the official code's fallback where theta + m > pi.

    Past pi, cos(theta + m) turns back up and would reward a worse angle. Where theta > pi - m the default
    switches to a CosFace-style penalty cos(theta) - m*sin(pi - m), which keeps falling as theta grows;
    `easy_margin` instead applies the margin only where theta < pi/2 and leaves the logit alone elsewhere.
    """
    phi = cos_plus_margin(target, margin)
    if easy_margin:
        return torch.where(target > 0, phi, target)
    return torch.where(target > torch.cos(math.pi - margin), phi, target - torch.sin(math.pi - margin) * margin)


class MarginLoss(nn.Module, ABC):
    """Cross-entropy over `scale * cosine`, with a margin on each sample's target logit only.

    Subclasses define `apply_margin`. The margin can warm up linearly from 0 over `margin_warmup_steps`
    (call `set_progress(step)` every step): a full margin on random features can stall the first epochs.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        margin: float,
        scale: float,
        margin_warmup_steps: int = 0,
        sub_centers: int = 1,
        max_margin: float = math.inf,
        more_problems: list[str] | None = None,
    ):
        super().__init__()
        rules = [
            (margin >= 0, f"{margin=} must be >= 0"),
            (margin < max_margin, f"{margin=} must be < {max_margin:.4g}"),
            (scale > 0, f"{scale=} must be > 0"),
            (margin_warmup_steps >= 0, f"{margin_warmup_steps=} must be >= 0"),
        ]
        problems = _head_problems(dim, num_classes, sub_centers) + [msg for ok, msg in rules if not ok]
        _raise_if(problems + (more_problems or []))
        self.head = CosineHead(dim, num_classes, sub_centers=sub_centers)
        self.full_margin = float(margin)
        self.scale = float(scale)
        self.margin_warmup_steps = int(margin_warmup_steps)
        # A buffer, so a resumed trial continues the warm-up where it stopped.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def set_progress(self, step: int) -> None:
        """Tell the loss the global optimizer step (drives the margin warm-up)."""
        self.step.fill_(step)

    def current_margin(self) -> torch.Tensor:
        """The margin now, as a 0-d tensor on the loss's device: reading the step as a Python number, or
        copying a fresh scalar to the GPU, would make every step wait for the device."""
        if self.margin_warmup_steps == 0:
            ramp = torch.ones_like(self.step, dtype=torch.float32)
        else:
            ramp = (self.step / self.margin_warmup_steps).clamp(max=1.0)
        return self.full_margin * ramp

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Plain cosine logits [B, C] for evaluation: no margin, no scale."""
        return self.head(embeddings)

    @abstractmethod
    def apply_margin(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
        """`cosine` [B, C] with the margin applied (unscaled). `norms`: the raw embeddings' L2 norms [B]."""

    def margin_logits(
        self, cosine: torch.Tensor, labels: torch.Tensor, *, norms: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The (cosine, labels) entry point: scaled logits with the margin, ready for cross-entropy."""
        return self.scale * self.apply_margin(at_least_float32(cosine), labels, norms)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> MarginOutput:
        """`embeddings` [B, D] as the backbone gives them (not normalised: AdaFace reads their norms)."""
        cosine = self.head(embeddings)
        norms = at_least_float32(embeddings.detach()).norm(dim=-1)
        logits = self.margin_logits(cosine, labels, norms=norms)
        # The cosine is for metrics only: detached, so holding it never keeps the graph alive.
        return MarginOutput(F.cross_entropy(logits, labels), cosine.detach())


@LOSSES.register("arcface")
class ArcFace(MarginLoss):
    """Additive angular margin (Deng et al. 2019): target logit cos(theta_y + m). Defaults: the paper's."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        margin: float = 0.5,
        scale: float = 64.0,
        easy_margin: bool = False,
        margin_warmup_steps: int = 0,
        sub_centers: int = 1,
    ):
        super().__init__(
            dim,
            num_classes,
            margin=margin,
            scale=scale,
            margin_warmup_steps=margin_warmup_steps,
            sub_centers=sub_centers,
            max_margin=math.pi,
        )
        self.easy_margin = easy_margin

    def apply_margin(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
        target = arcface_target(_target(cosine, labels), self.current_margin(), easy_margin=self.easy_margin)
        return _with_target(cosine, labels, target)


@LOSSES.register("subcenter_arcface")
class SubCenterArcFace(ArcFace):
    """ArcFace over K sub-centres per class (Deng et al. 2020): a class's cosine is its nearest sub-centre's."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        sub_centers: int = 3,
        margin: float = 0.5,
        scale: float = 64.0,
        easy_margin: bool = False,
        margin_warmup_steps: int = 0,
    ):
        super().__init__(
            dim,
            num_classes,
            margin=margin,
            scale=scale,
            easy_margin=easy_margin,
            margin_warmup_steps=margin_warmup_steps,
            sub_centers=sub_centers,
        )


@LOSSES.register("cosface")
class CosFace(MarginLoss):
    """Large margin cosine loss (Wang et al. 2018): target logit cos(theta_y) - m. Defaults: the paper's."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        margin: float = 0.35,
        scale: float = 64.0,
        margin_warmup_steps: int = 0,
    ):
        super().__init__(dim, num_classes, margin=margin, scale=scale, margin_warmup_steps=margin_warmup_steps)

    def apply_margin(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
        return _with_target(cosine, labels, _target(cosine, labels) - self.current_margin())


@LOSSES.register("adaface")
class AdaFace(MarginLoss):
    """Quality-adaptive margin (Kim et al. 2022), following the official code.

    The feature norm is a proxy for image quality. Normalised by running batch statistics,
    norm_hat = clip(h * (||z|| - mean) / (std + eps), -1, 1), and the target logit becomes
    cos(theta_y + g_angular) - g_additive with g_angular = -m * norm_hat, g_additive = m * norm_hat + m:
    high-norm (good-quality) samples get an additive, CosFace-like margin up to 2m and a negative angular one;
    low-norm samples get an angular, ArcFace-like margin and less additive margin, so hard samples are
    emphasised only while they are recognisable. The norms are detached: the margin steers, it is not trained.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        margin: float = 0.4,
        scale: float = 64.0,
        h: float = 0.333,
        momentum: float = 0.01,
        margin_warmup_steps: int = 0,
    ):
        rules = [(h > 0, f"{h=} must be > 0"), (0 < momentum <= 1, f"{momentum=} must be in (0, 1]")]
        super().__init__(
            dim,
            num_classes,
            margin=margin,
            scale=scale,
            margin_warmup_steps=margin_warmup_steps,
            max_margin=math.pi,
            more_problems=[msg for ok, msg in rules if not ok],
        )
        self.h = float(h)
        # Weight of the current batch in the running statistics (the official t_alpha).
        self.momentum = float(momentum)
        # The official initial values: a wide std keeps norm_hat near 0 (ArcFace-like) until the statistics
        # have seen ~1/momentum batches of real norms.
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def apply_margin(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
        if norms is None:
            raise ValueError("AdaFace needs the embeddings' norms: margin_logits(cosine, labels, norms=...)")
        # The official clip, against degenerate features.
        norms = norms.detach().to(cosine.dtype).clamp(0.001, 100.0)
        # A batch of one has no std; its statistics are skipped rather than turned into NaN.
        if self.training and norms.numel() > 1:
            with torch.no_grad():
                self.batch_mean.lerp_(norms.mean(), self.momentum)
                self.batch_std.lerp_(norms.std(), self.momentum)
        norm_hat = (self.h * (norms - self.batch_mean) / (self.batch_std + _ADAFACE_EPS)).clamp(-1.0, 1.0)
        margin = self.current_margin()
        g_angular = -margin * norm_hat
        g_additive = margin * norm_hat + margin
        theta = torch.acos(_target(cosine, labels).clamp(-1 + _ADAFACE_EPS, 1 - _ADAFACE_EPS))
        target = torch.cos((theta + g_angular).clamp(_ADAFACE_EPS, math.pi - _ADAFACE_EPS)) - g_additive
        return _with_target(cosine, labels, target)


@LOSSES.register("curricularface")
class CurricularFace(MarginLoss):
    """Adaptive curriculum margin (Huang et al. 2020), following the official code.

    The target logit is ArcFace's. A negative class j is "hard" when cos(theta_j) > cos(theta_y + m) (it beats
    the target's margined logit) and is re-weighted to cos(theta_j) * (t + cos(theta_j)); easy negatives stay.
    t is an EMA of the mean target cosine: near 0 early, so hard negatives are damped (easy samples first), and
    it grows as the model improves, so hard negatives weigh more later. t updates before it is used, as upstream.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        margin: float = 0.5,
        scale: float = 64.0,
        momentum: float = 0.01,
        margin_warmup_steps: int = 0,
    ):
        rules = [(0 < momentum <= 1, f"{momentum=} must be in (0, 1]")]
        super().__init__(
            dim,
            num_classes,
            margin=margin,
            scale=scale,
            margin_warmup_steps=margin_warmup_steps,
            max_margin=math.pi,
            more_problems=[msg for ok, msg in rules if not ok],
        )
        # Weight of the current batch in t: 0.01, i.e. t = 0.99 * t + 0.01 * mean(cos theta_y).
        self.momentum = float(momentum)
        self.register_buffer("t", torch.tensor(0.0))

    def apply_margin(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
        margin = self.current_margin()
        cosine = cosine.clamp(-1.0, 1.0)
        target = _target(cosine, labels)
        if self.training:
            with torch.no_grad():
                self.t.lerp_(target.mean(), self.momentum)
        # Hardness is judged against cos(theta_y + m) itself, not the fallback, as in the official code.
        hard = cosine > cos_plus_margin(target, margin)[:, None]
        cosine = torch.where(hard, cosine * (self.t + cosine), cosine)
        return _with_target(cosine, labels, arcface_target(target, margin))
