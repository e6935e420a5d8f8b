"""Optimizers and learning-rate schedules, as registries. Schedules are per step, with linear warm-up.

Outside `raycls.train` so that validating a config (`train.optimizer`, `train.scheduler`) loads these
registries without the training loop. In code the per-step lr schedule is never called a scheduler:
that word is for the trial schedulers (ASHA, FIFO) in `raycls.search`; the YAML key `train.scheduler`
keeps its name for existing search spaces.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from raycls.config.schema import TrainConfig
from raycls.models.classifier import classifier_of
from raycls.registry import Registry

OptimizerFactory = Callable[[list[dict], TrainConfig], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")

# A schedule maps progress after warm-up (0 -> 1) and the config to a multiplier of the base lr.
Schedule = Callable[[float, TrainConfig], float]
LR_SCHEDULES: Registry[Schedule] = Registry("lr schedule")


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0
    )


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


@OPTIMIZERS.register("adam")
def adam(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=config.lr, betas=config.betas)


@OPTIMIZERS.register("lamb")
def lamb(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """LAMB (You et al. 2020), timm's implementation: Adam with a per-layer trust ratio, for large batches."""
    from timm.optim import Lamb

    return Lamb(groups, lr=config.lr, betas=config.betas)


@OPTIMIZERS.register("lars")
def lars(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """LARS (You et al. 2017), timm's implementation: SGD with a per-layer trust ratio."""
    from timm.optim import Lars

    return Lars(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)


def param_groups(
    model: nn.Module, weight_decay: float, *, backbone: nn.Module | None = None, backbone_lr_mult: float = 1.0
) -> list[dict]:
    """Weight decay on weights only: decaying biases and norm scales hurts accuracy and buys nothing.
    With `backbone` and a multiplier other than 1, its parameters (less its classifier, a head) get their
    own groups at `lr * backbone_lr_mult` (LambdaLR scales each group's own initial lr)."""
    slow = _backbone_body(backbone) if backbone is not None and backbone_lr_mult != 1.0 else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault((param.ndim > 1, id(param) in slow), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            **({"lr_mult": backbone_lr_mult} if in_backbone else {}),
        }
        for (decay, in_backbone), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]


def _backbone_body(backbone: nn.Module) -> set[int]:
    """The backbone's parameters less its classifier (timm's get_classifier), which is a head."""
    head = classifier_of(backbone)
    excluded = {id(p) for p in head.parameters()} if head is not None else set()
    return {id(p) for p in backbone.parameters() if id(p) not in excluded}


def create_optimizer(
    config: TrainConfig, model: nn.Module, *, backbone: nn.Module | None = None
) -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay, backbone=backbone, backbone_lr_mult=config.lr_mult.backbone)
    optimizer = OPTIMIZERS.create(config.optimizer, groups, config)
    for group in optimizer.param_groups:  # the multiplier becomes the group's own lr, which schedules scale
        group["lr"] = config.lr * group.pop("lr_mult", 1.0)
    if config.lookahead is not None:
        from timm.optim import Lookahead

        optimizer = Lookahead(optimizer, alpha=config.lookahead.alpha, k=config.lookahead.k)
    return optimizer


@LR_SCHEDULES.register("cosine")
def cosine(progress: float, config: TrainConfig) -> float:
    floor = config.min_lr_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@LR_SCHEDULES.register("linear")
def linear(progress: float, config: TrainConfig) -> float:
    return 1.0 - (1.0 - config.min_lr_ratio) * progress


@LR_SCHEDULES.register("constant")
def constant(progress: float, config: TrainConfig) -> float:
    return 1.0


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, config: TrainConfig) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return LR_SCHEDULES.create(config.scheduler, min(progress, 1.0), config)


def create_lr_schedule(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps=total, warmup_steps=warmup, config=config)
    )
