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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: decaying biases and norm scales hurts accuracy and buys nothing."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS.create(config.optimizer, param_groups(model, config.weight_decay), config)


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
